"""Prompt text to token ids, with special-token text kept as plain text.

A client's text is data: ``<|im_end|>`` typed into a message must not end the turn (nor open
a forged system turn), just as the data pipeline's ``encode_documents`` keeps a document's
``<|endoftext|>`` from forging a document boundary. So chat prompts are built structurally:
the control tokens are inserted as ids, and roles and contents are encoded with the special
tokens' strings not recognized.

The plain-text encoder is a copy of the tokenizer whose ``encode_special_tokens`` is set once
and never toggled, so threads can share it (toggling the flag on a shared tokenizer would
race with other threads encoding). It encodes with ``encode_batch``, which releases the GIL
while it works: tokenizing a long prompt in a worker thread leaves the event loop free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer

CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
# Each token stands for at least one byte; a floor keeps the bound generous for vocabularies
# whose unknown-token can stand for more bytes than its own text.
MIN_BYTES_PER_TOKEN = 8


class PlainEncoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer: Tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.encode_special_tokens = True
        start, end = tokenizer.token_to_id(CHAT_START), tokenizer.token_to_id(CHAT_END)
        self.chat_ids = None if start is None or end is None else (start, end)
        # The most bytes of text one token can stand for: a text longer than the context
        # times this cannot fit it, whatever the tokenizer makes of it.
        longest = max(len(t.encode("utf-8", "surrogatepass")) for t in tokenizer.get_vocab())
        self.max_bytes_per_token = max(longest, MIN_BYTES_PER_TOKEN)

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, special-token strings encoded as plain text."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """ChatML ids of (role, content) turns: each ``<|im_start|>role\\ncontent<|im_end|>\\n``,
        then the assistant's turn opened. For text free of special-token strings these are the
        ids the formatted string would tokenize to (the tokenizer encodes the text between
        special tokens piece by piece)."""
        if self.chat_ids is None:
            raise ValueError("this tokenizer has no chat tokens")
        start, end = self.chat_ids
        pieces = [f"{role}\n{content}" for role, content in messages]
        *turns, newline, opening = self.encode([*pieces, "\n", "assistant\n"], False)
        ids: list[int] = []
        for turn in turns:
            ids += [start, *turn, end, *newline]
        return [*ids, start, *opening]
