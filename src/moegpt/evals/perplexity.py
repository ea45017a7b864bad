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

import torch
import torch.nn.functional as F

from moegpt.model import Transformer


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


@torch.no_grad()
def document_nll(
    model: Transformer, tokens: list[int], length: int, stride: int
) -> tuple[float, int]:
    """Summed negative log-likelihood of ``tokens[1:]`` and the count scored."""
    device = next(model.parameters()).device
    ids = torch.tensor(tokens, device=device)
    total, count = 0.0, 0
    for start, end, first in Windows.of(len(tokens), length, stride).spans:
        logits = model(ids[None, start:end]).logits[0].float()
        # logits at position p predict token p + 1; score targets first .. end - 1
        predicted = logits[first - 1 - start : end - 1 - start]
        targets = ids[first:end]
        total += float(F.cross_entropy(predicted, targets, reduction="sum"))
        count += end - first
    return total, count


def perplexity(
    model: Transformer, documents: list[list[int]], length: int, stride: int
) -> tuple[float, int]:
    """Perplexity over ``documents`` at windows of ``length`` tokens, and the tokens scored."""
    total, count = 0.0, 0
    for tokens in documents:
        nll, n = document_nll(model, tokens, length, stride)
        total, count = total + nll, count + n
    return math.exp(total / max(count, 1)), count
