"""The data manifest protects itself (a checksum of its canonical JSON), always verifies the
tokenizer file it names, checks eos_id, vocab_size and dtype against that tokenizer, and keeps
every file it names inside the data folder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from moegpt.data.mixture import Mixture
from moegpt.data.prepare import prepare
from moegpt.data.shards import read_manifest, tokenizer_file, write_manifest, write_shard
from moegpt.errors import UserError
from tests.data.conftest import document, make_config


@pytest.fixture
def prepared(corpus: Path):
    config = make_config(corpus)
    prepare(config, log=lambda m: None)
    return config, corpus / "prepared"


def _raw(data_dir: Path) -> dict:
    return json.loads((data_dir / "manifest.json").read_text())


def _edit_raw(data_dir: Path, edit) -> None:
    """Edit the manifest's JSON in place, as a person or a bit flip would (no re-sealing)."""
    manifest = _raw(data_dir)
    edit(manifest)
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _seal(data_dir: Path, edit) -> None:
    """Write a consistently sealed manifest with ``edit`` applied: only the checks against
    the tokenizer and the folder can catch it."""
    manifest = _raw(data_dir)
    edit(manifest)
    write_manifest(data_dir, manifest)


def _refused(config, match: str) -> str:
    data_dir = Path(config.data.data_dir)
    before = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=match) as info:
        Mixture.open(config.data)
    message = str(info.value)
    assert "\n" not in message
    assert {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()} == before
    return message


def test_the_checksum_is_sha256_of_the_canonical_json(prepared) -> None:
    _, data_dir = prepared
    manifest = _raw(data_dir)
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert manifest["version"] == 2
    assert manifest["checksum"] == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["tokenizer"].__setitem__("eos_id", m["tokenizer"]["eos_id"] ^ 1),  # 1 bit
        lambda m: m.__setitem__("dtype", "uint32"),
        lambda m: m["tokenizer"].pop("eos_id"),
        lambda m: m["sources"]["a"]["splits"]["train"]["shards"][0].pop("docs_file"),
        lambda m: m.pop("checksum"),
    ],
    ids=["eos-bit-flip", "dtype", "missing-eos", "missing-shard-field", "no-checksum"],
)
def test_edited_manifests_are_refused_in_one_line(prepared, edit) -> None:
    config, data_dir = prepared
    _edit_raw(data_dir, edit)
    message = _refused(config, "manifest.json: ")
    assert "checksum" in message and "moegpt prepare" in message


def test_prepare_rebuilds_an_edited_manifest(prepared) -> None:
    config, data_dir = prepared
    _edit_raw(data_dir, lambda m: m["tokenizer"].__setitem__("eos_id", 1))
    prepare(config, log=lambda m: None)
    assert read_manifest(data_dir)["tokenizer"]["eos_id"] == 0
    assert Mixture.open(config.data).eos_id == 0


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda m: m["tokenizer"].__setitem__("eos_id", 1),
            r"field tokenizer.eos_id = 1 is not .*tokenizer.json's <\|endoftext\|> id \(0\)",
        ),
        (
            lambda m: m["tokenizer"].__setitem__("eos_id", 99999),
            r"field tokenizer.eos_id = 99999 is not .*<\|endoftext\|> id \(0\)",
        ),
        (
            lambda m: m.__setitem__("dtype", "uint32"),
            r"field dtype = 'uint32', a \d+-id vocabulary is stored as 'uint16'",
        ),
        (
            lambda m: m["tokenizer"].__setitem__("vocab_size", 70000),
            r"field tokenizer.vocab_size = 70000, .*tokenizer.json has \d+ ids",
        ),
        (
            lambda m: m["tokenizer"].pop("eos_id"),
            r"field tokenizer.eos_id is missing",
        ),
        (
            lambda m: m["tokenizer"].__setitem__("eos_id", "0"),
            r"field tokenizer.eos_id = '0' has the wrong type",
        ),
        (
            lambda m: m["sources"]["a"]["splits"]["train"]["shards"][0].pop("docs_file"),
            r"field sources.a.splits.train.shards\[0\].docs_file is missing",
        ),
    ],
    ids=["eos-1", "eos-99999", "dtype", "vocab", "missing", "type", "shard-field"],
)
def test_sealed_but_inconsistent_fields_are_named(prepared, edit, match: str) -> None:
    config, data_dir = prepared
    _seal(data_dir, edit)
    _refused(config, f"^{data_dir / 'manifest.json'}: {match}")


def test_a_tokenizer_with_two_ids_swapped_is_refused(prepared) -> None:
    """Without data.tokenizer set: the tokenizer file's sha256 is verified on every open."""
    config, data_dir = prepared
    assert not config.data.tokenizer
    path = data_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(tokenizer))
    _refused(config, f"^{path}: sha256 differs from manifest.json's tokenizer.sha256")


@pytest.mark.parametrize(
    "name", ["/etc/hostname", "../tokenizer.json", "sub/../../tokenizer.json", "link.json"]
)
def test_the_tokenizer_file_stays_inside_the_data_folder(prepared, tmp_path: Path, name) -> None:
    config, data_dir = prepared
    outside = tmp_path / "outside.json"
    outside.write_bytes((data_dir / "tokenizer.json").read_bytes())  # even the same bytes
    (data_dir / "link.json").symlink_to(outside)
    _seal(data_dir, lambda m: m["tokenizer"].__setitem__("file", name))
    message = _refused(config, f"^{data_dir / 'manifest.json'}: field tokenizer.file = ")
    assert "inside" in message or "outside" in message
    with pytest.raises(UserError, match="field tokenizer.file"):
        tokenizer_file(data_dir, _raw(data_dir))  # the helper `moegpt export` copies through


def test_a_symlink_inside_the_data_folder_is_fine(prepared) -> None:
    config, data_dir = prepared
    (data_dir / "sub").mkdir()
    (data_dir / "sub" / "tok.json").symlink_to(data_dir / "tokenizer.json")
    _seal(data_dir, lambda m: m["tokenizer"].__setitem__("file", "sub/tok.json"))
    assert tokenizer_file(data_dir, read_manifest(data_dir)).name == "tok.json"
    Mixture.open(config.data)


@pytest.mark.parametrize("field", ["tokens_file", "docs_file"])
def test_shard_files_stay_inside_their_source_folder(prepared, field: str) -> None:
    config, data_dir = prepared
    shard = _raw(data_dir)["sources"]["a"]["splits"]["train"]["shards"][0]
    escaped = f"../b/{shard[field]}"
    _seal(
        data_dir,
        lambda m: m["sources"]["a"]["splits"]["train"]["shards"][0].__setitem__(field, escaped),
    )
    _refused(config, rf"field sources.a.splits.train.shards\[0\].{field} = .* not a plain file")


def test_a_v1_manifest_asks_for_prepare_which_upgrades_it_in_place(prepared) -> None:
    config, data_dir = prepared

    def as_v1(m: dict) -> None:
        m["version"] = 1
        del m["checksum"]

    _edit_raw(data_dir, as_v1)
    _refused(config, r"manifest.json: format v1 predates manifest checksums; re-run `moegpt pre")
    shards = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.bin")}
    messages: list[str] = []
    prepare(config, log=messages.append)
    assert "source 'a': up to date" in messages and "source 'b': up to date" in messages
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.bin")} == shards
    assert _raw(data_dir)["version"] == 2
    Mixture.open(config.data)


def test_an_interrupted_prepare_keeps_the_previous_tokenizer(corpus: Path, monkeypatch) -> None:
    """A retrained tokenizer only replaces the old one together with the manifest."""
    config = make_config(corpus)
    prepare(config, log=lambda m: None)
    data_dir = corpus / "prepared"
    tokenizer = (data_dir / "tokenizer.json").read_bytes()
    # Every document changes: which ones the tokenizer trains on (the training split) depends
    # on their paths, which differ from run to run.
    for i, path in enumerate(sorted((corpus / "a").glob("*.txt"))):
        path.write_text(document("a", i) + " zyxwvut qponml" * 50)
        os.utime(path, ns=(3, 3))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moegpt.data.prepare.write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(config, log=lambda m: None)
    monkeypatch.setattr("moegpt.data.prepare.write_shard", write_shard)
    assert (data_dir / "tokenizer.json").read_bytes() == tokenizer
    Mixture.open(config.data)  # the previous data still opens, tokenizer and all
    prepare(config, log=lambda m: None)
    assert (data_dir / "tokenizer.json").read_bytes() != tokenizer  # retrained: a new one
    assert not list(data_dir.glob(".tokenizer.json*"))
    Mixture.open(config.data)
