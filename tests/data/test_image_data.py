"""`kind = "image_text"` sources in `moegpt prepare`: each item becomes <|image|>, its caption
and end-of-text (the caption and end trained on, the marker not), with its image in the shard
beside it, checked by size and checksum on loading; the dataset's own test split stays held
out; and a recipe that cannot use images is refused in one line."""

from __future__ import annotations

import dataclasses
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from moegpt.config import ConfigError, SourceConfig, load_config
from moegpt.data.images import (
    FASHION_MNIST,
    RENDERED_MAX_CHARS,
    file_words,
    load_image_corpus,
    short_lines,
    word_lines,
)
from moegpt.data.mixture import Mixture, MixtureLoader
from moegpt.data.prepare import held_out_score, prepare
from moegpt.data.shards import open_split, read_manifest
from moegpt.data.tokenizer import END_OF_TEXT, IMAGE, encode_documents, load_tokenizer
from moegpt.errors import UserError
from moegpt.model.vision import media_mask


def recipe(root: Path, source: str, items: int, *extra: str, interleave: int = 1, epochs: int = 1):
    path = root / "vision.toml"
    path.write_text(
        "[model]\nvocab_size = 400\n"
        f'[data]\nseq_len = 64\ndata_dir = "{root / "prepared"}"\nworkers = 1\n'
        'packing = "documents"\ndocument_mask = true\n'
        f'[[data.sources]]\nname = "images"\nkind = "image_text"\npath = "{source}"\n'
        f"items = {items}\nval_fraction = 0.25\ninterleave = {interleave}\nepochs = {epochs}\n"
        "[vision]\nenabled = true\nimage_size = 32\nchannels = 1\n"
    )
    return load_config(path, list(extra))


def test_rendered_lines_are_prepared_with_their_images(tmp_path: Path) -> None:
    config = recipe(tmp_path, "stdlib:rendered", 40)
    data_dir = Path(config.data.data_dir)
    prepare(config, log=lambda m: None)
    manifest = read_manifest(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    marker, eos = tokenizer.token_to_id(IMAGE), tokenizer.token_to_id(END_OF_TEXT)
    made = load_image_corpus("stdlib:rendered", 40, 0.25, 32, config.data.seed, "test")
    by_caption = {c: made.images[i] for i, c in enumerate(made.documents)}
    seen = 0
    for split in ("train", "val"):
        opened = open_split(data_dir, manifest, "images", split)
        assert opened.images is not None
        for i in range(opened.documents):
            tokens, mask = opened.document(i), opened.mask(i)
            assert tokens[0] == marker and tokens[-1] == eos
            assert mask.tolist() == [0] + [1] * (len(tokens) - 1)
            caption = tokenizer.decode(tokens[1:-1].tolist())
            assert encode_documents(tokenizer, [caption])[0] == tokens[1:-1].tolist()
            assert np.array_equal(opened.image(i), by_caption[caption])  # its own image
            seen += 1
    assert seen == 40
    logs: list[str] = []
    prepare(config, log=logs.append)
    assert "source 'images': up to date" in logs


def test_word_lines_must_be_read_since_no_file_holds_them() -> None:
    """stdlib:rendered-words: lines of 8 to 32 characters, every word from the one file the
    line is keyed by, in an order no file has (so a language model that trained on the
    stdlib cannot recall them), the same for the same seed."""
    from moegpt.data.sources import stdlib_python_files, stdlib_root

    files, root = stdlib_python_files()[:40], stdlib_root()

    def draw(count: int, seed: int) -> list[tuple[str, str]]:
        return list(islice(word_lines(files, root, seed, RENDERED_MAX_CHARS), count))

    lines = draw(2000, seed=3)
    assert lines == draw(2000, seed=3) and lines != draw(2000, seed=4)
    assert draw(500, seed=3) == lines[:500]  # more lines asked for keep the first ones
    words = {key: set(found) for key, found in file_words(files, root, RENDERED_MAX_CHARS)}
    assert len(lines) == 2000
    for key, line in lines:
        assert 8 <= len(line) <= RENDERED_MAX_CHARS
        assert set(line.split(" ")) <= words[key], (key, line)
    assert len({key for key, _ in lines}) > 20  # drawn across the files
    assert len({line for _, line in lines}) > 0.95 * len(lines)
    real = {line for _, line in short_lines(files, root, RENDERED_MAX_CHARS)}
    # a line of a file can come out again only by chance, one of a single word mostly
    assert sum(line in real for _, line in lines) < 0.05 * len(lines)


def test_word_lines_are_prepared_and_held_out_by_file(tmp_path: Path) -> None:
    """The prepared shards hold every line asked for, each beside its own image, and no file
    has lines on both sides of the split: held-out files are those the key split holds out."""
    config = recipe(tmp_path, "stdlib:rendered-words", 60)
    data_dir = Path(config.data.data_dir)
    prepare(config, log=lambda m: None)
    manifest = read_manifest(data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    made = load_image_corpus("stdlib:rendered-words", 60, 0.25, 32, config.data.seed, "test")
    key_of = dict(zip(made.documents, made.keys, strict=True))
    keys = {}
    for split in ("train", "val"):
        opened = open_split(data_dir, manifest, "images", split)
        captions = [
            tokenizer.decode(opened.document(i)[1:-1].tolist()) for i in range(opened.documents)
        ]
        for i, caption in enumerate(captions):
            assert np.array_equal(opened.image(i), made.images[made.documents.index(caption)])
        keys[split] = {key_of[c] for c in captions}
    assert sum(len(v) for v in keys.values()) <= 60 and keys["val"]
    assert keys["train"].isdisjoint(keys["val"])
    assert all(held_out_score(k, config.data.seed) < 0.25 for k in keys["val"])
    assert all(held_out_score(k, config.data.seed) >= 0.25 for k in keys["train"])


def test_word_lines_need_a_count_and_an_image_they_fit(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"items: stdlib:rendered-words makes as many lines"):
        recipe(tmp_path, "stdlib:rendered-words", 0)
    with pytest.raises(
        UserError, match=r"test: only [\d,]+ of 80 lines of stdlib:rendered-words fit"
    ):
        load_image_corpus("stdlib:rendered-words", 20, 0.25, 12, 0, "test")


def test_image_corpora_are_image_text_sources(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"kind: stdlib:rendered-words holds images with captions"
    ):
        SourceConfig(name="w", kind="text", path="stdlib:rendered-words", items=5)


def test_a_damaged_image_file_is_caught_on_loading(tmp_path: Path) -> None:
    config = recipe(tmp_path, "stdlib:rendered", 12)
    data_dir = Path(config.data.data_dir)
    prepare(config, log=lambda m: None)
    manifest = read_manifest(data_dir)
    shard = manifest["sources"]["images"]["splits"]["train"]["shards"][0]
    path = data_dir / "images" / shard["images_file"]
    pixels = bytearray(path.read_bytes())
    pixels[100] ^= 0xFF
    path.write_bytes(bytes(pixels))
    with pytest.raises(UserError, match="images.bin: checksum differs from the manifest"):
        open_split(data_dir, manifest, "images", "train")


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_canvases_hold_out_the_datasets_test_split(tmp_path: Path) -> None:
    config = recipe(tmp_path, "debian:fashion-mnist", 40)
    prepare(config, log=lambda m: None)
    manifest = read_manifest(Path(config.data.data_dir))
    splits = manifest["sources"]["images"]["splits"]
    assert (splits["train"]["documents"], splits["val"]["documents"]) == (30, 10)
    made = load_image_corpus("debian:fashion-mnist", 40, 0.25, 32, config.data.seed, "test")
    assert [k.split(":")[0] for k, held in zip(made.keys, made.held_out, strict=True) if held] == [
        "test"
    ] * 10


def test_sequences_carry_their_documents_images_in_order(tmp_path: Path) -> None:
    config = recipe(tmp_path, "stdlib:rendered", 30)
    prepare(config, log=lambda m: None)
    mixture = Mixture.open(config.data)
    tokenizer = load_tokenizer(Path(config.data.data_dir) / "tokenizer.json")
    marker = tokenizer.token_to_id(IMAGE)
    made = load_image_corpus("stdlib:rendered", 30, 0.25, 32, config.data.seed, "test")
    by_caption = {c: made.images[i] for i, c in enumerate(made.documents)}
    for g in range(mixture.n_sequences):
        row = mixture.sequence(g)
        starts = np.flatnonzero(row["input_ids"] == marker)
        assert len(row["images"]) == len(starts) >= 1
        for image, start in zip(row["images"], starts, strict=True):
            end = (
                start
                + 1
                + np.argmax(row["input_ids"][start + 1 :] == tokenizer.token_to_id(END_OF_TEXT))
            )
            caption = tokenizer.decode(row["input_ids"][start + 1 : end].tolist())
            assert np.array_equal(image, by_caption[caption])
    batch = next(iter(MixtureLoader(mixture, batch_size=3, document_mask=True)))
    counts = (batch["input_ids"] == marker).sum(dim=1)
    assert batch["images"].shape == (3, int(counts.max()), 32, 32)
    assert batch["images"].dtype == torch.uint8


@pytest.mark.parametrize(("interleave", "epochs"), [(1, 1), (4, 2)])
def test_interleaved_items_are_few_shot_episodes(
    tmp_path: Path, interleave: int, epochs: int
) -> None:
    """``interleave = 4``: image, caption, image, caption, ... in one document of up to four
    items (positions running on, each caption seeing its own image), episodes never split
    between sequences nor epochs (30 items: none holds an item twice), and every training
    item still read once an epoch."""
    config = recipe(
        tmp_path, "stdlib:rendered", 40, "--data.seq_len=256", interleave=interleave, epochs=epochs
    )
    prepare(config, log=lambda m: None)
    mixture = Mixture.open(config.data)
    tokenizer = load_tokenizer(Path(config.data.data_dir) / "tokenizer.json")
    marker, eos = tokenizer.token_to_id(IMAGE), tokenizer.token_to_id(END_OF_TEXT)
    made = load_image_corpus("stdlib:rendered", 40, 0.25, 32, config.data.seed, "test")
    by_caption = {c: made.images[i] for i, c in enumerate(made.documents)}
    seen: list[str] = []
    sizes = []
    for g in range(mixture.n_sequences):
        row = mixture.sequence(g)
        ids, documents = row["input_ids"], row["document_ids"]
        batch = torch.from_numpy(ids)[None]
        visible, _ = media_mask(
            batch, marker, len(row["images"]), 1, torch.from_numpy(documents)[None]
        )
        used = ids != eos
        for d in np.unique(documents[used]):
            span = np.flatnonzero(documents == d)
            assert np.array_equal(row["positions"][span], np.arange(len(span)))
            markers = span[ids[span] == marker]
            sizes.append(len(markers))
            episode = len(seen)
            for m in markers:  # "<|image|> caption <eos> <eos>", seeing image number m
                end = m + 1 + np.argmax(ids[m + 1 :] == eos)
                seen.append(tokenizer.decode(ids[m + 1 : end].tolist()))
                image = int(np.count_nonzero(ids[: m + 1] == marker)) - 1
                assert np.array_equal(row["images"][image], by_caption[seen[-1]])
                assert visible[0, 0, m + 1 : end + 1].nonzero()[:, 1].unique().tolist() == [image]
                assert ids[end + 1] == eos
            assert len(set(seen[episode:])) == len(markers)  # no item twice in an episode
    train = open_split(
        Path(config.data.data_dir), read_manifest(Path(config.data.data_dir)), "images", "train"
    )
    items = [tokenizer.decode(train.document(i)[1:-1].tolist()) for i in range(train.documents)]
    assert sorted(seen) == sorted(items * epochs)
    # each epoch cut on its own: 30 items in 4s are seven episodes of 4 and one of 2
    n = len(items)
    per_epoch = [interleave] * (n // interleave) + ([n % interleave] if n % interleave else [])
    assert sorted(sizes) == sorted(per_epoch * epochs)


def test_the_clip_stage_does_not_interleave(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.sources: 'images' interleaves its items"):
        recipe(tmp_path, "stdlib:rendered", 4, "--vision.objective", "clip", interleave=2)


def test_a_dataset_with_its_own_test_split_does_not_shrink_other_sources(tmp_path) -> None:
    """Fashion-MNIST's val_fraction sizes its own held-out canvases; the documents other
    sources never train on are set by the sources split by key alone."""
    config = recipe(tmp_path, "stdlib:rendered", 4)
    fashion = dataclasses.replace(
        config.data.sources[0], name="fashion", path="debian:fashion-mnist", val_fraction=0.5
    )
    data = dataclasses.replace(config.data, sources=(*config.data.sources, fashion))
    assert data.exclude_below == 0.25


def test_recipes_that_cannot_use_images_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vision.enabled: image_text source 'images' needs"):
        recipe(tmp_path, "stdlib:rendered", 4, "--vision.enabled", "false")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: image_text sources are"):
        recipe(tmp_path, "stdlib:code", 4)
    with pytest.raises(ConfigError, match="data.packing: image_text sources train on whole"):
        recipe(tmp_path, "stdlib:rendered", 4, "--data.packing", "stream")


def test_data_inspect_reports_padding_and_episodes(tmp_path: Path) -> None:
    """The report's padding share is the rows' padding masks' mean, and its documents an
    episode what the rows' document ids hold."""
    from moegpt.data.inspect import inspect_data

    config = recipe(tmp_path, "stdlib:rendered", 40, "--data.seq_len=256", interleave=4)
    prepare(config, log=lambda m: None)
    whole = inspect_data(config)["whole_documents"]
    mixture = Mixture.open(config.data)
    rows = [mixture.sequence(g) for g in range(mixture.n_sequences)]
    padding = np.concatenate([r["padding"] for r in rows])
    assert whole["padding_share"] == pytest.approx(padding.mean())
    tokenizer = load_tokenizer(Path(config.data.data_dir) / "tokenizer.json")
    marker = tokenizer.token_to_id(IMAGE)
    per_episode = [
        int((r["input_ids"][r["document_ids"] == d] == marker).sum())
        for r in rows
        for d in np.unique(r["document_ids"][~r["padding"]])
    ]
    assert whole["documents_per_episode"] == pytest.approx(np.mean(per_episode))
    assert 1 < whole["documents_per_episode"] <= 4


@pytest.mark.parametrize(
    "path",
    [
        "stdlib:rendered",
        "stdlib:rendered-words",
        pytest.param(
            "debian:fashion-mnist",
            marks=pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="no Fashion-MNIST"),
        ),
    ],
)
def test_held_out_items_read_back_from_the_shards_equal_those_drawn_again(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluations read a prepared recipe's held-out items back from its shards (drawing
    250,000 lines again took minutes) and get what drawing them again gives; a folder
    prepared with other settings is not read, and the items are drawn again."""
    from moegpt.evals import vision

    config = recipe(tmp_path, path, 60)
    drawn = vision.held_out_items(config, path, 8)  # nothing prepared yet: drawn
    prepare(config, log=lambda m: None)
    calls = []
    draw = vision.load_image_corpus
    monkeypatch.setattr(
        vision, "load_image_corpus", lambda *a, **k: calls.append(a) or draw(*a, **k)
    )
    read = vision.held_out_items(config, path, 8)
    assert not calls  # read back, not drawn
    assert read.captions == drawn.captions and np.array_equal(read.images, drawn.images)
    assert len(read.train_captions) == len(drawn.train_captions) == len(read.train_images)
    for i in (0, len(drawn.train_captions) - 1, -2):
        assert read.train_captions[i] == drawn.train_captions[i]
        assert np.array_equal(read.train_images[i], drawn.train_images[i])
    assert list(read.train_captions) == list(drawn.train_captions)  # and iteration ends
    other = recipe(tmp_path, path, 40)  # the same folder, prepared for 60 items
    vision.held_out_items(other, path, 8)
    larger = recipe(tmp_path, path, 60, "--vision.image_size=48")  # prepared at 32 pixels
    assert vision.held_out_items(larger, path, 8).images.shape[1:] == (48, 48)
    assert len(calls) == 2
