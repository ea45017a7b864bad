"""`moegpt prepare`: shards and manifest, idempotence, change detection, corruption errors."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from moegpt.config import load_config
from moegpt.data.mixture import Mixture
from moegpt.data.prepare import (
    check_held_out_keys,
    fraction_above,
    held_out_score,
    prepare,
    split_documents,
)
from moegpt.data.shards import read_manifest, write_manifest, write_shard
from moegpt.data.sources import Corpus
from moegpt.data.tokenizer import load_tokenizer
from moegpt.errors import UserError
from tests.data.conftest import document, make_config


def _files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


def test_prepare_writes_shards_that_decode_back_to_the_documents(corpus: Path) -> None:
    config = make_config(corpus)
    manifest = prepare(config, log=lambda m: None)
    prepared = corpus / "prepared"
    tokenizer = load_tokenizer(prepared / "tokenizer.json")
    assert manifest["dtype"] == "uint16"
    a = manifest["sources"]["a"]["splits"]
    assert a["train"]["documents"] + a["val"]["documents"] == 23  # equal fractions: none lost
    assert 1 <= a["val"]["documents"] <= 6
    train = Mixture.open(config.data).splits[0]
    texts = {tokenizer.decode(train.document(i).tolist()) for i in range(train.documents)}
    assert texts <= {document("a", i) for i in range(23)}
    assert len(texts) == a["train"]["documents"]


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_count_does_not_change_the_shards(corpus: Path, workers: int) -> None:
    config = make_config(corpus, "--data.workers", str(workers))
    manifest = prepare(config, log=lambda m: None)
    shards = manifest["sources"]["b"]["splits"]["train"]["shards"]
    reference = make_config(corpus, "--data.workers", "1", "--data.data_dir", str(corpus / "ref"))
    expected = prepare(reference, log=lambda m: None)["sources"]["b"]["splits"]["train"]["shards"]
    assert [s["tokens_sha256"] for s in shards] == [s["tokens_sha256"] for s in expected]


def test_rerun_is_a_no_op_and_changes_are_detected(corpus: Path) -> None:
    prepare(make_config(corpus), log=lambda m: None)
    # a fixed tokenizer, so that editing source a cannot change source b's tokens
    shutil.copy(corpus / "prepared" / "tokenizer.json", corpus / "tok.json")
    config = make_config(corpus, "--data.tokenizer", str(corpus / "tok.json"))
    prepare(config, log=lambda m: None)
    before = _files(corpus / "prepared")
    messages: list[str] = []
    prepare(config, log=messages.append)
    assert _files(corpus / "prepared") == before
    assert "source 'a': up to date" in messages and "source 'b': up to date" in messages

    (corpus / "a" / "005.txt").write_text(document("a", 5) + " now longer")
    os.utime(corpus / "a" / "005.txt", ns=(1, 1))  # a different mtime even on coarse clocks
    messages.clear()
    prepare(config, log=messages.append)
    assert "source 'b': up to date" in messages
    assert not any(m.startswith("source 'a': up to date") for m in messages)
    # the old shard files of 'a' were replaced, not left behind
    assert len(list((corpus / "prepared" / "a").glob("*.bin"))) == 4


def test_a_changed_tokenizer_reprepares_everything(corpus: Path) -> None:
    prepare(make_config(corpus), log=lambda m: None)
    messages: list[str] = []
    prepare(make_config(corpus, "--model.vocab_size", "300"), log=messages.append)
    assert not any("up to date" in m for m in messages)
    assert read_manifest(corpus / "prepared")["tokenizer"]["vocab_size"] <= 300


def _shard(corpus: Path, kind: str) -> Path:
    return next((corpus / "prepared" / "a").glob(f"train-*.{kind}.bin"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "bytes, the manifest says"),
        (lambda p: p.write_bytes(b"\x01\x00" + p.read_bytes()[2:]), "checksum differs"),
        (lambda p: p.unlink(), "shard file missing"),
    ],
)
def test_damaged_shards_are_named_in_one_line(corpus: Path, damage, message: str) -> None:
    config = make_config(corpus)
    prepare(config, log=lambda m: None)
    path = _shard(corpus, "tokens")
    damage(path)
    untouched = {p: p.read_bytes() for p in (corpus / "prepared").rglob("*.bin")}
    with pytest.raises(UserError) as info:
        Mixture.open(config.data)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)
    assert {p: p.read_bytes() for p in (corpus / "prepared").rglob("*.bin")} == untouched


def test_a_shard_from_another_tokenizer_is_refused(corpus: Path) -> None:
    config = make_config(corpus)
    prepare(config, log=lambda m: None)
    other = make_config(corpus, "--model.vocab_size", "300", "--data.data_dir", str(corpus / "o"))
    prepare(other, log=lambda m: None)
    mine = _shard(corpus, "tokens")
    theirs = next((corpus / "o" / "a").glob("train-*.tokens.bin"))
    shutil.copy(theirs, mine)
    with pytest.raises(UserError, match=f"^{mine}: "):
        Mixture.open(config.data)


def test_an_interrupted_prepare_keeps_the_previous_data(corpus: Path, monkeypatch) -> None:
    config = make_config(corpus)
    prepare(config, log=lambda m: None)
    (corpus / "a" / "000.txt").write_text(document("a", 0) + " edited")
    os.utime(corpus / "a" / "000.txt", ns=(2, 2))
    calls = []

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C or kill would, mid-preparation
        return write_shard(*args, **kwargs)

    monkeypatch.setattr("moegpt.data.prepare.write_shard", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(config, log=lambda m: None)
    monkeypatch.undo()
    previous = load_config(corpus / "recipe.toml")  # the recipe is unchanged; the data old
    Mixture.open(previous.data)  # the old manifest and every shard it names still verify
    prepare(config, log=lambda m: None)  # and the next run completes and cleans up
    assert Mixture.open(config.data).n_sequences > 0


def test_a_failed_prepare_keeps_the_previous_data(corpus: Path) -> None:
    config = make_config(corpus)
    prepare(config, log=lambda m: None)
    before = {p: p.read_bytes() for p in (corpus / "prepared").rglob("*") if p.is_file()}
    with (corpus / "b.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(UserError, match=r"b.jsonl:18: not valid JSON"):
        prepare(config, log=lambda m: None)
    after = {p: p.read_bytes() for p in (corpus / "prepared").rglob("*") if p.is_file()}
    assert after == before
    Mixture.open(config.data)  # still loads


def test_unprepared_sources_and_missing_manifest(corpus: Path, tmp_path: Path) -> None:
    config = make_config(corpus)
    with pytest.raises(UserError, match="manifest.json: not found; run `moegpt prepare"):
        Mixture.open(config.data)
    prepare(config, log=lambda m: None)
    manifest = json.loads((corpus / "prepared" / "manifest.json").read_text())
    del manifest["sources"]["b"]
    write_manifest(corpus / "prepared", manifest)  # sealed: a consistent manifest without b
    with pytest.raises(UserError, match=r"data.sources\[1\] 'b': not prepared"):
        Mixture.open(config.data)


def test_bad_folders_and_manifests_are_one_line(corpus: Path, tmp_path: Path) -> None:
    config = make_config(corpus)
    prepare(config, log=lambda m: None)
    path = corpus / "prepared" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["dtype"]
    write_manifest(corpus / "prepared", manifest)  # sealed, so the field check is what fails
    with pytest.raises(UserError, match="manifest.json: field dtype is missing"):
        Mixture.open(config.data)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="data.data_dir: .* exists and is not a folder"):
        prepare(make_config(corpus, "--data.data_dir", str(tmp_path / "file")), log=print)
    (corpus / "empty").mkdir()
    (corpus / "empty" / "blank.txt").write_text("   \n")
    empty = make_config(
        corpus,
        "--data.sources.0.path",
        str(corpus / "empty"),
        "--data.data_dir",
        str(tmp_path / "e"),
    )
    with pytest.raises(UserError, match=r"data.sources\[0\] 'a': no documents"):
        prepare(empty, log=lambda m: None)


def corpus_of(keys: list[str]) -> Corpus:
    return Corpus([], lambda: [(key, f"document {i} of {key}") for i, key in enumerate(keys)])


def test_a_source_that_selects_no_key_holds_out_every_document_of_its_lowest() -> None:
    """A fraction too small for the source's keys still holds one key out, with all of its
    documents: holding out one document of a key would train on its siblings."""
    keys = [f"file{i}" for i in range(12) for _ in range(3)]  # three documents a key
    scores = {key: held_out_score(key, 7) for key in keys}
    train, val = split_documents(keys, 1e-9, 1e-9, 7)
    lowest = min(scores, key=scores.get)
    assert sorted(keys[i] for i in val) == [lowest] * 3
    assert lowest not in {keys[i] for i in train} and len(train) == len(keys) - 3


def test_a_key_one_source_holds_out_and_another_trains_on_is_refused(tmp_path: Path) -> None:
    """Two sources of the same files: the first's tiny fraction holds out its lowest key,
    which the second (holding out nothing) would train on. The refusal names the field and
    the fraction that holds the key out of both."""
    keys = [f"stdlib/m{i}.py" for i in range(40)]
    config = make_config(tmp_path, "--data.seed=5")
    data = config.data
    first = dataclasses.replace(data.sources[0], name="code", val_fraction=1e-6)
    second = dataclasses.replace(data.sources[0], name="text", val_fraction=0.0)
    data = dataclasses.replace(data, sources=(first, second))
    lowest = min(keys, key=lambda k: held_out_score(k, 5))
    suggested = fraction_above(held_out_score(lowest, 5))
    with pytest.raises(
        UserError,
        match=rf"^data.sources\[0\].val_fraction: 1e-06 holds out none of 'code''s documents, "
        rf"so it holds out {re.escape(lowest)}, which 'text' trains on; {suggested} holds it",
    ):
        check_held_out_keys([(first, corpus_of(keys)), (second, corpus_of(keys))], data)
    fixed = dataclasses.replace(first, val_fraction=suggested)
    data = dataclasses.replace(data, sources=(fixed, second))
    check_held_out_keys([(fixed, corpus_of(keys)), (second, corpus_of(keys))], data)
    _, val = split_documents(keys, suggested, data.exclude_below, 5)
    assert lowest in {keys[i] for i in val}


def test_fraction_above_is_the_next_two_figure_decimal() -> None:
    assert fraction_above(0.2213) == 0.23
    assert fraction_above(0.23) == 0.24
    assert fraction_above(0.000123) == 0.00013
