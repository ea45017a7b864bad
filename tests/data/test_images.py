"""Image-text data that ships (data/images.py): the IDX reader against arrays written here,
Fashion-MNIST canvases whose captions say where each item is, and rendered lines of code."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest

from moegpt.config import ConfigError, DataConfig, SourceConfig
from moegpt.data.images import (
    FASHION_CLASSES,
    FASHION_MNIST,
    augmented,
    compose,
    fashion_canvases,
    fashion_mnist,
    load_image_corpus,
    read_idx,
    render,
    short_lines,
)
from moegpt.data.prepare import corpus_split
from moegpt.data.sources import stdlib_code
from moegpt.errors import UserError


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return path


def test_idx_files_read_back_what_was_written(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x.gz", images)), images)
    truncated = tmp_path / "short.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress((tmp_path / "x.gz").read_bytes())[:-7]))
    with pytest.raises(UserError, match="short.gz: holds 3913 bytes for a \\(5, 28, 28\\) array"):
        read_idx(truncated)
    (tmp_path / "plain").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="plain: not a readable gzipped IDX file"):
        read_idx(tmp_path / "plain")


def test_a_missing_dataset_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", tmp_path)


def test_canvases_put_each_item_where_the_caption_says() -> None:
    first, second = np.full((4, 4), 200, np.uint8), np.full((4, 4), 100, np.uint8)
    side, caption = compose(first, second, ("bag", "coat"), horizontal=True)
    assert caption == "a bag to the left of a coat" and side.shape == (8, 8)
    assert set(np.unique(side[:, :4])) == {0, 200} and set(np.unique(side[:, 4:])) == {0, 100}
    stacked, caption = compose(first, second, ("bag", "coat"), horizontal=False)
    assert caption == "a bag above a coat"
    assert set(np.unique(stacked[:4])) == {0, 200} and set(np.unique(stacked[4:])) == {0, 100}


def test_canvases_are_reproducible_and_captioned_from_the_labels() -> None:
    images = np.stack([np.full((4, 4), 10 * (i + 1), np.uint8) for i in range(10)])
    labels = np.arange(10, dtype=np.uint8)
    made = list(fashion_canvases(images, labels, 20, seed=3, prefix="train"))
    again = list(fashion_canvases(images, labels, 20, seed=3, prefix="train"))
    assert [m.caption for m in made] == [a.caption for a in again]
    for item in made:
        # Each item's brightness names its class: the caption must name the same two.
        shades = sorted(set(np.unique(item.image)) - {0})
        named = {FASHION_CLASSES[s // 10 - 1] for s in shades}
        assert all(name in item.caption for name in named) and len(named) == 2


@pytest.mark.parametrize("path", ["stdlib:rendered", "stdlib:rendered-words"])
def test_lines_drawn_by_worker_processes_are_those_one_process_draws(path: str) -> None:
    """Two processes, chunk by chunk in order, a few chunks ahead: the same lines with the
    same images, stopping at ``items`` (2,500 spans three chunks and part of a fourth)."""
    one = load_image_corpus(path, 2500, 0.1, 32, 0, "test")
    two = load_image_corpus(path, 2500, 0.1, 32, 0, "test", workers=2)
    assert len(one.documents) == 2500
    assert one.documents == two.documents and one.keys == two.keys
    assert np.array_equal(one.images, two.images)


def test_drawing_stops_at_the_lines_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from moegpt.data import images

    drawn: list[int] = []
    real = images._draw_chunk
    monkeypatch.setattr(
        images, "_draw_chunk", lambda lines, *a: drawn.append(len(lines)) or real(lines, *a)
    )
    lines = [(f"k{i}", f"line {i:05d}") for i in range(100_000)]
    made = images.draw_lines(lines, items=1500, image_size=32, workers=1, expected=1500)
    assert [m.caption for m in made] == [line for _, line in lines[:1500]]
    assert drawn == [images.DRAW_CHUNK, images.DRAW_CHUNK]  # not the other 97,952 lines


def test_an_augmented_item_is_the_item_mirrored_or_not_and_moved_at_most_two_pixels() -> None:
    rng = np.random.default_rng(0)
    item = np.zeros((12, 12), np.uint8)
    item[2:10, 3:9] = rng.integers(1, 256, size=(8, 6))  # a black margin of 2 or more
    views = np.random.default_rng(5)
    seen = set()
    for _ in range(1000):
        view = augmented(item, views)
        assert view.shape == item.shape and view.sum() == item.sum()  # nothing cut off
        found = [
            (mirrored, dy, dx)
            for mirrored, source in ((False, item), (True, item[:, ::-1]))
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(np.roll(source, (dy, dx), axis=(0, 1)), view)
        ]
        assert found, "not a mirrored or shifted copy"
        seen.update(found)
    assert len(seen) == 50  # every mirroring and shift, each from -2 to 2, is drawn


def test_augmenting_changes_the_pixels_and_keeps_the_pairs() -> None:
    images = np.stack([np.pad(np.full((4, 4), 10 * (i + 1), np.uint8), 2) for i in range(10)])
    images[:, 2, 2] = 255  # a corner mark, so that a mirrored item differs
    labels = np.arange(10, dtype=np.uint8)
    plain = list(fashion_canvases(images, labels, 30, seed=3, prefix="train"))
    views = list(fashion_canvases(images, labels, 30, seed=3, prefix="train", augment=True))
    assert [m.caption for m in plain] == [v.caption for v in views]
    pairs = list(zip(plain, views, strict=True))
    assert sum(not np.array_equal(m.image, v.image) for m, v in pairs) > 20
    # the same pixels, moved
    assert all(np.array_equal(np.sort(m.image, None), np.sort(v.image, None)) for m, v in pairs)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_augmenting_leaves_the_held_out_canvases_as_the_dataset_has_them() -> None:
    plain = load_image_corpus("debian:fashion-mnist", 200, 0.1, 32, 0, "test")
    views = load_image_corpus("debian:fashion-mnist", 200, 0.1, 32, 0, "test", augment=True)
    assert plain.documents == views.documents
    assert np.array_equal(plain.held_out, views.held_out)
    held = plain.held_out
    assert np.array_equal(plain.images[held], views.images[held])
    assert not np.array_equal(plain.images[~held], views.images[~held])
    assert plain.fingerprint != views.fingerprint


def test_augment_is_for_fashion_canvases_only() -> None:
    with pytest.raises(
        ConfigError, match=r"augment: only debian:fashion-mnist's canvases are augmented"
    ):
        SourceConfig(name="lines", kind="image_text", path="stdlib:rendered", augment=True)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_the_installed_fashion_mnist_is_read_whole() -> None:
    images, labels = fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced


def test_rendered_text_is_drawn_and_too_much_is_refused() -> None:
    image = render("print(x)", image_size=32, font_size=8)
    assert image.shape == (32, 32) and image.dtype == np.uint8
    assert (image < 128).sum() > 20  # ink
    assert np.array_equal(image, render("print(x)", 32, 8))
    assert not np.array_equal(image, render("print(y)", 32, 8))
    with pytest.raises(ValueError, match="needs .* rows of 8-pixel text"):
        render("x" * 200, image_size=32, font_size=8)


def test_short_lines_keep_their_module_and_skip_comments_and_repeats(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        "import os\n# a comment here\nx = compute(value)\nx = compute(value)\n"
        + "y = 'caf\u00e9 au lait'\n"
        + "z = "
        + "1" * 40
        + "\n"
    )
    (tmp_path / "top.py").write_text("    return result\n")
    files = [tmp_path / "pkg" / "mod.py", tmp_path / "top.py"]
    assert short_lines(files, tmp_path, max_chars=32) == [
        ("stdlib/pkg/mod.py", "import os"),
        ("stdlib/pkg/mod.py", "x = compute(value)"),
        ("stdlib/top.py", "return result"),
    ]


def test_rendered_lines_are_held_out_with_their_files_code() -> None:
    """stdlib:rendered keys a line by its file, as stdlib:code and stdlib:text do: a recipe
    mixing them never trains on the code of a file whose lines it holds out."""
    rendered = load_image_corpus("stdlib:rendered", 400, 0.05, 32, 1234, "path")
    code = stdlib_code()
    assert set(rendered.keys) <= set(code.keys)
    sources = (
        SourceConfig(name="code", kind="code", path="stdlib:code", val_fraction=0.05),
        SourceConfig(
            name="lines", kind="image_text", path="stdlib:rendered", items=400, val_fraction=0.05
        ),
    )
    data = dataclasses.replace(
        DataConfig(), sources=sources, packing="documents", document_mask=True
    )
    code_train, _ = corpus_split(code, sources[0], data)
    _, lines_val = corpus_split(rendered, sources[1], data)
    held_out = {rendered.keys[i] for i in lines_val}
    assert held_out and held_out.isdisjoint(code.keys[i] for i in code_train)
