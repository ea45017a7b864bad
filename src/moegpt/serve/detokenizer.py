"""Text of a sequence as its tokens arrive, in time independent of how long it already is.

Decoding the whole output after every token costs time quadratic in its length. Here each
token decodes a short window instead: the tokens since the last emitted character boundary,
with the tokens just before them as context (some decoders drop a leading space when a window
starts mid-text). Text that ends in an incomplete UTF-8 character (a byte-level BPE token can
hold part of one) is held back until the character completes. Stop strings are searched only
in the new text and the few characters before it that a stop string could straddle.

A run of tokens that ends in bytes that never form a character (only an untrained or broken
model emits one) keeps the window open, and so grows it, until a character completes.
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"  # what a decoder makes of a character whose bytes are not all there yet


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        # the longest tail of old text a stop string could start in
        self._overlap = max((len(s) - 1 for s in stops), default=0)
        self.text = ""
        self.stopped = False  # a stop string ended the text
        self._context = 0  # token index where the decoding window's context starts
        self._emitted = 0  # tokens whose text is in ``self.text``

    def _window(self, ids: list[int]) -> tuple[str, str]:
        """The context's text and the context plus the pending tokens' text."""
        context = self.tokenizer.decode(ids[self._context : self._emitted])
        return context, self.tokenizer.decode(ids[self._context :])

    def push(self, ids: list[int]) -> bool:
        """Take ``ids`` (the whole output so far, one token longer than last time or more);
        True if the text now holds a stop string (the text is then cut where it starts)."""
        context, full = self._window(ids)
        if len(full) <= len(context) or full.endswith(INCOMPLETE):
            return False  # nothing new yet, or a character still incomplete
        before = len(self.text)
        self.text += full[len(context) :]
        self._context, self._emitted = self._emitted, len(ids)
        return self._cut_at_stop(max(before - self._overlap, 0))

    def finish(self, ids: list[int]) -> None:
        """The sequence ended: add what is held back, incomplete characters as the decoder
        renders them (so the text equals a decode of ``ids``), unless a stop string ended it."""
        if self.stopped:
            return
        context, full = self._window(ids)
        self.text += full[len(context) :]
        self._context = self._emitted = len(ids)

    def _cut_at_stop(self, start: int) -> bool:
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped
