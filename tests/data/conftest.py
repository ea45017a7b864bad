"""Small on-disk corpora for the data tests: distinct, countable documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moegpt.config import Config, load_config

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def document(source: str, i: int) -> str:
    """A unique document: its name, then a pseudo-random run of words."""
    body = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + i % 11))
    return f"[{source}-{i}] {body}."


def write_corpus(root: Path, n_a: int = 23, n_b: int = 17) -> None:
    (root / "a").mkdir(parents=True)
    for i in range(n_a):
        (root / "a" / f"{i:03d}.txt").write_text(document("a", i))
    with (root / "b.jsonl").open("w") as f:
        for i in range(n_b):
            f.write(json.dumps({"text": document("b", i), "id": i}) + "\n")


def make_config(root: Path, *overrides: str, epochs: tuple[int, int] = (4, 2)) -> Config:
    recipe = root / "recipe.toml"
    recipe.write_text(
        "[model]\nvocab_size = 320\nmax_seq_len = 64\n"
        f'[data]\nseq_len = 16\ndata_dir = "{root / "prepared"}"\nworkers = 1\n'
        f'[[data.sources]]\nname = "a"\npath = "{root / "a"}"\nepochs = {epochs[0]}\n'
        "val_fraction = 0.1\n"
        f'[[data.sources]]\nname = "b"\nkind = "code"\npath = "{root / "b.jsonl"}"\n'
        f"epochs = {epochs[1]}\nval_fraction = 0.1\n"
    )
    return load_config(recipe, list(overrides))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    write_corpus(tmp_path)
    return tmp_path
