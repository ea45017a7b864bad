"""Incremental detokenization: the same text as decoding the whole output, for a bounded cost
per token; stop strings found across token boundaries and cut where they start."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from moegpt.data.tokenizer import load_tokenizer, train_tokenizer
from moegpt.serve.detokenizer import IncrementalDetokenizer
from moegpt.serve.engine import Engine
from moegpt.serve.output import OutputProcessor
from moegpt.serve.sequence import SamplingParams
from moegpt.serve.step import RequestOutput

TEXT = "def héllo(wörld):\n    return '日本語 ✓ ok' * 3  # ünïcode ☃\n" * 8


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT, Path(torch.__file__).read_text()], vocab_size=400)


class CountingTokenizer:
    """Counts the token ids each decode call is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded = 0

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def test_text_equals_a_whole_decode_at_every_token(tokenizer) -> None:
    rng = random.Random(0)
    real = tokenizer.encode(TEXT).ids
    # Real text, and random ids: byte tokens that split characters, invalid byte runs.
    for ids in [real, [rng.randrange(tokenizer.get_vocab_size()) for _ in range(300)]]:
        detok = IncrementalDetokenizer(tokenizer)
        for n in range(1, len(ids) + 1):
            assert not detok.push(ids[:n])
            whole = tokenizer.decode(ids[:n])
            assert whole.startswith(detok.text)
            if ids is real:  # only an incomplete last character is ever held back
                assert len(whole) - len(detok.text) <= 1
        detok.finish(ids)
        assert detok.text == tokenizer.decode(ids)


def test_a_character_split_across_tokens_is_held_back(tokenizer) -> None:
    snowman = list("☃".encode())  # three bytes: byte-level tokens exist for each
    byte_token = {b: tokenizer.token_to_id(_byte_level(b)) for b in snowman}
    assert all(t is not None for t in byte_token.values())
    ids = [tokenizer.encode("a").ids[0], *(byte_token[b] for b in snowman)]
    detok = IncrementalDetokenizer(tokenizer)
    texts = []
    for n in range(1, len(ids) + 1):
        detok.push(ids[:n])
        texts.append(detok.text)
    assert texts == ["a", "a", "a", "a☃"]


def _byte_level(byte: int) -> str:
    """The byte-level alphabet's character for ``byte`` (GPT-2's mapping)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def test_decoding_work_per_token_is_bounded(tokenizer) -> None:
    ids = tokenizer.encode(TEXT * 4).ids
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    for n in range(1, len(ids) + 1):
        detok.push(ids[:n])
    # A whole decode per token would read len(ids)^2 / 2 ids (here ~100x more).
    assert counting.decoded <= 8 * len(ids), (counting.decoded, len(ids))
    assert detok.text == tokenizer.decode(ids)


@pytest.mark.parametrize("stop", ["return", "ok' *", "\n    ", "✓", "3  #"])
def test_stop_strings_across_token_boundaries(tokenizer, stop: str) -> None:
    ids = tokenizer.encode(TEXT).ids
    detok = IncrementalDetokenizer(tokenizer, (stop, "never there"))
    for n in range(1, len(ids) + 1):
        if detok.push(ids[:n]):
            break
    else:
        pytest.fail("stop string not found")
    assert detok.text == TEXT[: TEXT.index(stop)]
    assert not tokenizer.decode(ids[: n - 1]).count(stop)  # found at the first chance
    detok.finish(ids)
    assert detok.text == TEXT[: TEXT.index(stop)]  # finishing adds nothing after a stop


def test_engine_decodes_incrementally(text_model: Path) -> None:
    """Through the engine: a whole decode per token reads 1 + 2 + ... + 100 = 5,050 ids for
    100 tokens. The test model is untrained: its output is full of byte tokens that leave
    characters open (which widen the window), so the bound is looser than for real text."""
    engine = Engine.from_folder(text_model, device="cpu")
    counting = CountingTokenizer(load_tokenizer(text_model / "tokenizer.json"))
    engine.tokenizer = counting
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    (completion,) = engine.generate([[1, 2, 3]], params)[0]
    assert len(completion.token_ids) == 100
    assert completion.text == counting.tokenizer.decode(completion.token_ids)
    assert counting.decoded <= 5050 / 4, counting.decoded


def test_processor_ends_a_sequence_at_a_stop_string_and_drops_later_tokens(tokenizer) -> None:
    """The engine's tokens arrive in batches (speculation appends several a step) and keep
    coming until the engine hears of the stop: the processor cuts at the stop string, says so
    once, and drops everything after it."""
    ids = tokenizer.encode(TEXT).ids
    stop = "return"
    processor = OutputProcessor(tokenizer, (stop,))
    outputs, stopped_at = [], []
    for start in range(0, 60, 3):
        batch = RequestOutput("r", 0, ids[start : start + 3], completion_tokens=start + 3)
        out, stopped = processor.process(batch)
        if out is not None:
            outputs.append(out)
        if stopped:
            stopped_at.append(start)
    assert len(stopped_at) == 1
    text = "".join(o.text for o in outputs)
    assert text == TEXT[: TEXT.index(stop)]
    kept = [t for o in outputs for t in o.token_ids]
    assert stop in tokenizer.decode(kept) and stop not in tokenizer.decode(kept[:-1])
    assert outputs[-1].finished and outputs[-1].finish_reason == "stop"
    assert outputs[-1].completion_tokens == len(kept)
