"""Prompt text to token ids, with special-token text kept as plain text.

A client's text is data: ``<|endoftext|>`` typed into a prompt must not become a control
token, just as the data pipeline's ``encode_documents`` keeps a document's ``<|endoftext|>``
from forging a document boundary (chat prompts keep contents plain the same way: see
:mod:`moegpt.chat`).

The plain-text encoder is a copy of the tokenizer whose ``encode_special_tokens`` is set once
and never toggled, so threads can share it (toggling the flag on a shared tokenizer would
race with other threads encoding). It encodes with ``encode_batch``, which releases the GIL
while it works: tokenizing a long prompt in a worker thread leaves the event loop free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

# Each token stands for at least one byte; a floor keeps the bound generous for vocabularies
# whose unknown-token can stand for more bytes than its own text.
MIN_BYTES_PER_TOKEN = 8


class PlainEncoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer: Tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.encode_special_tokens = True
        # The most bytes of text one token can stand for: a text longer than the context
        # times this cannot fit it, whatever the tokenizer makes of it.
        longest = max(len(t.encode("utf-8", "surrogatepass")) for t in tokenizer.get_vocab())
        self.max_bytes_per_token = max(longest, MIN_BYTES_PER_TOKEN)

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, special-token strings encoded as plain text."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]
