"""From the engine's token outputs to what a client sees: text, stop strings, held-back text.

This runs wherever the outputs are consumed, not on the engine's stepping thread: the
asynchronous engine runs it on the event loop, so detokenizing never delays a step. A stop
string found here ends the sequence: the processor says so, and the caller tells the engine
to finish it (tokens the engine drew meanwhile are dropped here).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from moegpt.serve.detokenizer import IncrementalDetokenizer
from moegpt.serve.step import RequestOutput


@dataclass
class _Stream:
    detokenizer: IncrementalDetokenizer
    ids: list[int] = field(default_factory=list)
    sent_text: int = 0  # characters already streamed
    done: bool = False


class OutputProcessor:
    """Text for one request's ``n`` sequences (``tokenizer`` None: token ids only)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        # text that could still become a stop string is held back until the next token
        self._hold = max((len(s) - 1 for s in stops), default=0)
        self._streams: dict[int, _Stream] = {}

    def process(self, out: RequestOutput) -> tuple[RequestOutput | None, bool]:
        """The output with its text, or None once the sequence ended here already; and
        whether a stop string ended it just now (the engine must then finish it)."""
        if self.tokenizer is None:
            return out, False
        stream = self._streams.setdefault(
            out.index, _Stream(IncrementalDetokenizer(self.tokenizer, self.stops))
        )
        if stream.done:
            return None, False
        kept = 0
        stopped = False
        for token in out.token_ids:
            stream.ids.append(token)
            kept += 1
            if stream.detokenizer.push(stream.ids):
                stopped = True
                break
        finished = out.finished or stopped
        text = stream.detokenizer.text
        if finished:
            stream.detokenizer.finish(stream.ids)  # adds what was held back, unless stopped
            text = stream.detokenizer.text
            end = len(text)
        else:
            end = max(len(text) - self._hold, stream.sent_text)
        piece = text[stream.sent_text : end]
        stream.sent_text = end
        stream.done = finished
        processed = replace(
            out,
            token_ids=out.token_ids[:kept],
            text=piece,
            logprobs=out.logprobs[:kept],
            finished=finished,
            finish_reason="stop" if stopped else out.finish_reason,
            completion_tokens=len(stream.ids),
        )
        return processed, stopped
