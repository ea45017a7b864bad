"""Sliding-window perplexity of long documents at a given context length (the YaRN and
Position Interpolation papers' measure).

Each window of ``length`` tokens advances by ``stride`` (at most ``length``); a window scores
only the tokens the previous window did not, each with up to ``length - 1`` tokens of context
before it. With ``stride < length`` every token after the document's first is scored once;
with ``stride = length`` (disjoint chunks, as Hugging Face's recipe does then) a chunk's first
token has no context inside its window and is not scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moegpt.serve.engine import Engine
from moegpt.serve.sequence import SamplingParams


@dataclass
class Windows:
    """The windows of one document: (start, end, first scored position) each."""

    spans: list[tuple[int, int, int]]

    @classmethod
    def of(cls, n_tokens: int, length: int, stride: int) -> Windows:
        if not 0 < stride <= length:
            raise ValueError(f"stride {stride} must be in 1..length ({length})")
        spans, scored_to, start = [], 1, 0  # a window's first token has nothing before it
        while scored_to < n_tokens:
            end = min(start + length, n_tokens)
            first = max(scored_to, start + 1)
            if first < end:
                spans.append((start, end, first))
            scored_to = end
            start += stride
        return cls(spans)


def perplexity(
    engine: Engine, documents: list[list[int]], length: int, stride: int
) -> tuple[float, int]:
    """Perplexity over ``documents`` at windows of ``length`` tokens, and the tokens scored.

    Every window of every document is one request that scores its prompt and draws nothing
    (``prompt_logprobs`` with ``max_tokens`` 0), all batched by the serving engine."""
    params = SamplingParams(max_tokens=0, prompt_logprobs=True)
    scored_from: dict[str, int] = {}  # request -> first scored index inside its window
    for tokens in documents:
        for start, end, first in Windows.of(len(tokens), length, stride).spans:
            request = engine.add_request(tokens[start:end], params)
            scored_from[request] = first - start
    total, count = 0.0, 0
    while engine.has_work():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                window = out.prompt_logprobs[scored_from.pop(out.request_id) :]
                total -= math.fsum(lp for lp in window if lp is not None)
                count += len(window)
    return math.exp(total / max(count, 1)), count
