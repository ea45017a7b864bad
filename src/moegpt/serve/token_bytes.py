"""The raw bytes each token stands for, as OpenAI's chat log-probabilities report them.

A byte-level BPE token may hold part of a UTF-8 character, and decoding it alone gives U+FFFD,
whose bytes are not the token's. The bytes come from the vocabulary instead: byte-level BPE
spells every byte as one printable character (GPT-2's table, rebuilt below), SentencePiece's
byte fallback spells one as ``<0xHH>`` and its word boundary as ``▁``. Other tokenizers' tokens
are their decoded text.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_WORD_BOUNDARY = "\u2581"  # SentencePiece's ▁


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: the printable Latin-1 bytes stand for
    themselves and the other 68 (controls, space, NBSP, soft hyphen) for 256, 257, ... in
    byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    char_of = {byte: byte for byte in printable}
    for byte in range(256):
        if byte not in char_of:
            char_of[byte] = 256 + len(char_of) - len(printable)
    return {chr(char): byte for byte, char in char_of.items()}


_BYTE_LEVEL = _byte_level_table()


class TokenBytes:
    """``token_bytes(id)``: the bytes token ``id`` adds to the output, for a ``tokenizers``
    Tokenizer; concatenated over a sequence's tokens they are its text's UTF-8."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        steps = decoder.get("decoders", [decoder]) if decoder else []
        kinds = {step.get("type") for step in steps}
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.sentencepiece = "Metaspace" in kinds or any(
            step.get("type") == "Replace"
            and step.get("pattern", {}).get("String") == _WORD_BOUNDARY
            for step in steps
        )
        self.added = set(tokenizer.get_added_tokens_decoder())
        self._cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> bytes:
        if token not in self._cache:
            self._cache[token] = self._bytes(token)
        return self._cache[token]

    def _bytes(self, token: int) -> bytes:
        piece = self.tokenizer.id_to_token(token)
        if piece is None:
            return b""
        if token in self.added:  # special and added tokens are their own text
            return piece.encode()
        if self.byte_level and all(char in _BYTE_LEVEL for char in piece):
            return bytes(_BYTE_LEVEL[char] for char in piece)
        if self.byte_fallback and (match := _BYTE_PIECE.fullmatch(piece)):
            return bytes.fromhex(match.group(1))
        if self.sentencepiece:
            return piece.replace(_WORD_BOUNDARY, " ").encode()
        return self.tokenizer.decode([token]).encode()
