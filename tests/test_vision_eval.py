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
from moegpt.evals.vision import (
    HeldOut,
    Query,
    classify,
    edit_distance,
    name_scores,
    per_class_line,
    transcribe,
)


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
    assert result == {
        "items": 6,
        "accuracy": pytest.approx(2 / 6),
        "shots": shots,
        "per_class": {
            "dress": {"accuracy": 0.0, "items": 1},
            "sneaker": {"accuracy": 1.0, "items": 2},
            "bag": {"accuracy": 0.0, "items": 2},
            "coat": {"accuracy": 0.0, "items": 1},
        },
    }
    assert per_class_line(result["per_class"]) == (
        "dress 0% of 1, coat 0% of 1, bag 0% of 2, sneaker 100% of 2"
    )
    assert tokenizer.token_to_id(IMAGE) is not None


class Bigram(torch.nn.Module):
    """A stand-in whose next-token logits depend on the token before and on the last image
    (each image's pixel value picks a bias row)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.image_embedding = torch.nn.Parameter(torch.zeros(1))
        self.table = torch.randn(vocab, vocab, generator=generator)
        self.by_image = torch.randn(4, vocab, generator=generator)

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> SimpleNamespace:
        bias = self.by_image[images[:, -1, 0, 0].long()]
        return SimpleNamespace(logits=self.table[tokens] + bias[:, None])


def test_name_scores_equal_each_candidate_scored_alone(tokenizer) -> None:
    """Batched, padded and gathered, each name's score is the sum of its own tokens'
    log-probabilities after what all names share, as one row alone gives it."""
    model = Bigram(tokenizer.get_vocab_size())
    marker = tokenizer.token_to_id(IMAGE)
    images = np.stack([np.full((8, 8), i, np.uint8) for i in range(3)])
    context = [marker, *tokenizer.encode("a bag above a coat").ids, 0, marker]
    queries = [
        Query([marker], images[:1], "a ", "bag"),
        Query(context, images[1:], "a sneaker to the left of a ", "coat"),
    ]
    got = name_scores(model, tokenizer, queries, rows_per_batch=7)  # batches split queries
    for query, scores in zip(queries, got, strict=True):
        encoded = [tokenizer.encode(query.prefix + name).ids for name in FASHION_CLASSES]
        shared = min(
            next((i for i, (a, b) in enumerate(zip(e, encoded[0], strict=False)) if a != b), len(e))
            for e in encoded
        )
        pixels = torch.from_numpy(query.images)[None]
        for name_ids, score in zip(encoded, scores, strict=True):
            row = torch.tensor([query.context + name_ids])
            logprobs = model(row, pixels).logits[0].log_softmax(-1)
            first = len(query.context) + shared
            want = sum(float(logprobs[p - 1, row[0, p]]) for p in range(first, row.shape[1]))
            assert score == pytest.approx(want, abs=1e-4)
