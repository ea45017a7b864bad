"""The byte-level BPE: lossless on any string, specials reserved, documents can't forge EOS."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from moegpt.data.tokenizer import (
    END_OF_TEXT,
    SPECIAL_TOKENS,
    encode_documents,
    load_tokenizer,
    train_tokenizer,
)
from moegpt.errors import UserError

TRAIN_TEXT = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog."] * 50


def random_strings(seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(50):
        n = rng.randint(0, 60)
        # Any code point but the surrogates (which no UTF-8 text can hold).
        points = [
            rng.choice([rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF), rng.randint(0, 127)])
            for _ in range(n)
        ]
        out.append("".join(map(chr, points)))
        raw = bytes(rng.randint(0, 255) for _ in range(n))
        out.append(raw.decode("latin-1"))  # binary-ish: every byte value, NUL included
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TRAIN_TEXT, 300)


@pytest.mark.parametrize("seed", range(4))
def test_round_trip_is_lossless(tokenizer, seed: int) -> None:
    texts = [*random_strings(seed), "", " ", "\n\n\t", "<|endoftext|> inside", "日本語 😀 ﷺ"]
    for text, ids in zip(texts, encode_documents(tokenizer, texts), strict=True):
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_are_reserved_first(tokenizer) -> None:
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.get_vocab_size() <= 300


def test_documents_cannot_forge_end_of_text(tokenizer) -> None:
    eos = tokenizer.token_to_id(END_OF_TEXT)
    (ids,) = encode_documents(tokenizer, ["a <|endoftext|> b"])
    assert eos not in ids
    # ordinary encoding (prompts, chat templates) still maps the string to the special id
    assert eos in tokenizer.encode("a <|endoftext|> b").ids


def test_saved_tokenizer_loads_and_bad_files_are_named(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_str())
    assert load_tokenizer(path).get_vocab_size() == tokenizer.get_vocab_size()
    with pytest.raises(UserError, match="missing.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    path.write_text("{broken")
    with pytest.raises(UserError, match="tokenizer.json: not a tokenizer.json"):
        load_tokenizer(path)


def test_vocabulary_too_small_for_bytes_is_refused() -> None:
    with pytest.raises(UserError, match="model.vocab_size: 100 is below the byte alphabet"):
        train_tokenizer(TRAIN_TEXT, 100)
