"""Turning a row of logits into a token: temperature, top-k, top-p, per-sequence seeded
generators, and log-probabilities of the raw model distribution (as OpenAI reports them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moegpt.serve.sequence import SamplingParams


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities a request samples from (fp32, shape of ``logits``): softmax of
    logits / temperature restricted to the top-k tokens and the top-p nucleus, renormalised.
    Greedy requests get a point mass on the argmax."""
    logits = logits.float()
    if params.greedy:
        probs = torch.zeros_like(logits)
        probs[logits.argmax()] = 1.0
        return probs
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.numel():
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(dim=0) - sorted_probs  # mass of the more likely tokens
        drop = before >= params.top_p  # the smallest set reaching top_p stays (never empty)
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum()
    return probs


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # most likely alternatives


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Sampled:
    probs = distribution(logits, params)
    if params.greedy:
        token = int(probs.argmax())
    else:
        token = int(torch.multinomial(probs, 1, generator=generator))
    return with_logprobs(logits, token, params.logprobs)


def with_logprobs(logits: torch.Tensor, token: int, alternatives: int | None) -> Sampled:
    """``token`` with its log-probability under the raw model distribution and the
    ``alternatives`` most likely tokens' (None: no log-probabilities asked for)."""
    if alternatives is None:
        return Sampled(token)
    logprobs = logits.float().log_softmax(dim=-1)
    top = logprobs.topk(alternatives) if alternatives else None
    pairs = (
        list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    )
    return Sampled(token, float(logprobs[token]), pairs)
