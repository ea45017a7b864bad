"""Each token's raw bytes (chat log-probabilities' ``bytes``): concatenated over a text's
tokens they are the text's UTF-8, also where a token holds part of a character."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from moegpt.data.tokenizer import END_OF_TEXT, train_tokenizer
from moegpt.serve.token_bytes import _BYTE_LEVEL, TokenBytes

TEXT = "naïve café: 日本語 ✓ 🙂\n\tdef f(x):  return x  # ¬ ­soft"


def test_the_byte_table_is_the_byte_level_alphabet() -> None:
    assert sorted(_BYTE_LEVEL.values()) == list(range(256))
    assert set(_BYTE_LEVEL) == set(pre_tokenizers.ByteLevel.alphabet())
    # the table's own anchors: space is 288 ("Ġ"), newline 266 ("Ċ"), "!" itself
    assert (_BYTE_LEVEL["\u0120"], _BYTE_LEVEL["\u010a"], _BYTE_LEVEL["!"]) == (32, 10, 33)


def test_byte_level_tokens_concatenate_to_the_text() -> None:
    tokenizer = train_tokenizer(["def f(x):\n    return x\n" * 50], vocab_size=300)
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer.encode(TEXT).ids
    pieces = [token_bytes(i) for i in ids]
    assert b"".join(pieces) == TEXT.encode()
    # some token is part of a character: decoded alone it is U+FFFD, its bytes are its own
    partial = [i for i, piece in zip(ids, pieces, strict=True) if not valid_utf8(piece)]
    assert partial and all("\ufffd" in tokenizer.decode([i]) for i in partial)
    end = tokenizer.token_to_id(END_OF_TEXT)
    assert token_bytes(end) == END_OF_TEXT.encode()


def test_sentencepiece_byte_fallback_tokens() -> None:
    vocab = {"<unk>": 0, "\u2581the": 1, "\u2581": 2, "<0xE2>": 3, "<0x9C>": 4, "<0x93>": 5}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    token_bytes = TokenBytes(tokenizer)
    ids = [1, 2, 3, 4, 5]  # "▁the", "▁" and "✓" as its three bytes
    assert tokenizer.decode(ids) == " the ✓"
    assert b"".join(token_bytes(i) for i in ids) == " the ✓".encode()
    assert token_bytes(3) == b"\xe2"


def valid_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True
