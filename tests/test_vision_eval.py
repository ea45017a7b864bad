"""The vision evaluations' arithmetic, against models whose answers are known: a scripted
model that transcribes (or misreads) each image's line, and one that prefers one class."""

from __future__ import annotations

import functools
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moegpt.data.images import FASHION_CLASSES
from moegpt.data.tokenizer import END_OF_TEXT, IMAGE, train_tokenizer
from moegpt.evals.vision import HeldOut, classify, edit_distance, transcribe


def reference_distance(a: str, b: str) -> int:
    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_edit_distance_matches_the_recursive_definition() -> None:
    rng = random.Random(0)
    assert edit_distance("kitten", "sitting") == 3
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert edit_distance(a, b) == reference_distance(a, b)


@pytest.fixture(scope="module")
def tokenizer():
    captions = [f"a {x} to the left of a {y}" for x in FASHION_CLASSES for y in FASHION_CLASSES]
    return train_tokenizer(captions + ["import os", "x = 1", "print(x)"] * 20, 300)


class Scripted(torch.nn.Module):
    """A stand-in vision model: image i (all pixels equal to i) makes it write ``lines[i]``
    token by token, then end-of-text."""

    def __init__(self, tokenizer, lines: list[str]) -> None:
        super().__init__()
        self.image_embedding = torch.nn.Parameter(torch.zeros(1))
        eos = tokenizer.token_to_id(END_OF_TEXT)
        self.scripts = [[*tokenizer.encode(line).ids, eos] for line in lines]
        self.vocab = tokenizer.get_vocab_size()

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*tokens.shape, self.vocab)
        for row in range(tokens.shape[0]):
            script = self.scripts[int(images[row, -1, 0, 0])]
            for position in range(tokens.shape[1]):
                written = position  # tokens after the image marker
                logits[row, position, script[min(written, len(script) - 1)]] = 10.0
        return SimpleNamespace(logits=logits)


def items_of(lines: list[str]) -> HeldOut:
    images = np.stack([np.full((8, 8), i, np.uint8) for i in range(len(lines))])
    return HeldOut(images, lines, images[:0], [])


def test_transcription_errors_are_counted_per_character(tokenizer) -> None:
    lines = ["import os", "x = 1", "print(x)"]
    perfect = transcribe(Scripted(tokenizer, lines), tokenizer, items_of(lines), batch=2)
    assert perfect["character_error_rate"] == 0 and perfect["exact_match"] == 1
    misread = ["import os", "x = 2", "print(x)"]
    result = transcribe(Scripted(tokenizer, misread), tokenizer, items_of(lines), batch=2)
    assert result["character_error_rate"] == pytest.approx(1 / sum(map(len, lines)))
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["worst"][0] == {"line": "x = 1", "transcribed": "x = 2"}


class Prefers(torch.nn.Module):
    """A stand-in that, at every position, puts its mass on the tokens of one phrase."""

    def __init__(self, tokenizer, phrase: str) -> None:
        super().__init__()
        self.image_embedding = torch.nn.Parameter(torch.zeros(1))
        self.bias = torch.zeros(tokenizer.get_vocab_size())
        self.bias[tokenizer.encode(phrase).ids] = 10.0

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.bias.expand(*tokens.shape, -1))


@pytest.mark.parametrize("shots", [0, 2])
def test_classification_by_likelihood_picks_the_preferred_name(tokenizer, shots) -> None:
    captions = ["a sneaker to the left of a bag", "a bag above a sneaker", "a coat above a dress"]
    images = np.zeros((3, 8, 8), np.uint8)
    train = HeldOut(images, captions, images, captions)
    model = Prefers(tokenizer, "a sneaker to the left of a sneaker above a sneaker")
    result = classify(model, tokenizer, train, shots=shots, seed=0)
    # The model always answers "sneaker": right for 2 of the 6 items.
    assert result == {"items": 6, "accuracy": pytest.approx(2 / 6), "shots": shots}
    assert tokenizer.token_to_id(IMAGE) is not None
