"""Turning rows of logits into tokens: temperature, top-k, top-p, per-sequence seeded
generators, and log-probabilities of the raw model distribution (as OpenAI reports them).
A step's rows are drawn together on the device (:func:`sample_batch`)."""

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


def batch_distribution(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """:func:`distribution` for a batch of rows at once (one set of kernels, no host sync):
    row i is ``distribution(logits[i], params[i])``. The vocabulary sort that top-k and
    top-p need runs only when some row asks for one of them."""
    logits = logits.float()
    vocab = logits.shape[-1]
    settings = torch.tensor(
        [
            [
                p.temperature if not p.greedy else 1.0,
                p.top_k if 0 < p.top_k < vocab else vocab,
                p.top_p,
                p.greedy,
            ]
            for p in params
        ]
    ).to(logits.device, non_blocking=True)
    temperature, top_k, top_p, greedy = settings.unbind(dim=1)
    scaled = logits / temperature[:, None]
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
        ordered, order = scaled.sort(dim=-1, descending=True)
        kth = ordered.gather(1, (top_k.long() - 1)[:, None])
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(dim=-1)
        sorted_probs = probs.gather(1, order)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs * keep)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    else:
        probs = scaled.softmax(dim=-1)
    if not any(p.greedy for p in params):
        return probs
    point = torch.zeros_like(probs).scatter(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy.bool()[:, None], point, probs)


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # most likely alternatives

    def as_dict(self) -> dict:
        """The log-probability record a response carries."""
        return {"token": self.token, "logprob": self.logprob, "top": self.top}


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


class Draw:
    """A batch's drawn tokens on the device (``tokens``) with the log-probabilities its rows
    ask for, packed so that one device-to-host copy brings everything back: start it with
    :meth:`copy_to_host` (asynchronous on a GPU), read it with :meth:`results`."""

    def __init__(
        self, tokens: torch.Tensor, packed: torch.Tensor, params: list[SamplingParams], top: int
    ) -> None:
        self.tokens = tokens
        self._packed = packed
        self._params = params
        self._top = top
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def copy_to_host(self) -> None:
        if self._packed.is_cuda:
            self._host = torch.empty(self._packed.shape, pin_memory=True)
            self._host.copy_(self._packed, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = self._packed

    def results(self) -> list[Sampled]:
        """The tokens as :class:`Sampled` records (waits for the copy)."""
        if self._host is None:
            self.copy_to_host()
        if self._copied is not None:
            self._copied.synchronize()
        assert self._host is not None
        out = []
        top = self._top
        for row, p in zip(self._host.tolist(), self._params, strict=True):
            token = int(row[0])
            if p.logprobs is None:
                out.append(Sampled(token))
                continue
            k = p.logprobs
            indices, values = row[2 : 2 + top], row[2 + top :]
            pairs = [(int(t), v) for t, v in zip(indices[:k], values[:k], strict=True)]
            out.append(Sampled(token, row[1], pairs))
        return out


def draw(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> Draw:
    """A token for every row of ``logits`` (row i drawn with ``params[i]`` and
    ``generators[i]``), with the log-probabilities each asks for, on the logits' device and
    without waiting for it.

    Each row draws by the exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)`` per token,
    which picks token t with probability p_t: unseeded rows share one batched draw, seeded
    rows draw from their own generator (so a seed reproduces whatever the batch holds). An
    all-greedy batch is one argmax.
    """
    if all(p.greedy for p in params):
        tokens = logits.argmax(dim=-1)
    else:
        probs = batch_distribution(logits, params)
        race = torch.empty_like(probs).exponential_()
        for i, generator in enumerate(generators):
            if generator is not None:
                race[i].exponential_(generator=generator)
        # A draw of exactly 0 would make 0 / 0 = NaN, which argmax would pick, for a token
        # of probability 0 (a uniform of exactly 0 has chance 2**-24 per token in fp32).
        race.clamp_(min=torch.finfo(race.dtype).tiny)
        tokens = (probs / race).argmax(dim=-1)
    top = max((p.logprobs or 0 for p in params), default=0)
    parts = [tokens.float()[:, None]]  # token ids are exact in fp32 below 2**24
    if any(p.logprobs is not None for p in params):
        logprobs = logits.float().log_softmax(dim=-1)
        parts.append(logprobs.gather(1, tokens[:, None]))
        if top:
            best = logprobs.topk(top, dim=-1)
            parts += [best.indices.float(), best.values]
    return Draw(tokens, torch.cat(parts, dim=1), params, top)


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[Sampled]:
    """:func:`draw`, brought back to the host: one device-to-host copy for the batch."""
    return draw(logits, params, generators).results()


@dataclass
class Proposal:
    tokens: list[int]
    # (len(tokens), vocab) distributions the tokens were drawn from; None: point masses
    probs: torch.Tensor | None = None


def verify(
    target: torch.Tensor | None,
    argmax: list[int],
    proposal: Proposal,
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """Tokens to append and how many proposed ones were accepted.

    ``target`` (k + 1, vocab) holds the target's sampling distributions q at the k proposed
    positions and one past them. Proposed token x at position i is accepted with probability
    min(1, q(x) / p(x)); at the first rejection a token is drawn from the normalised residual
    max(0, q - p) and the rest is discarded; if all k pass, a bonus token is drawn from the
    last row. ``target`` None is greedy: the target's ``argmax`` tokens are accepted exactly.
    """
    out: list[int] = []
    for i, token in enumerate(proposal.tokens):
        if target is None:
            if token != argmax[i]:
                return [*out, argmax[i]], i
            out.append(token)
            continue
        q = target[i]
        p = proposal.probs[i] if proposal.probs is not None else _point(q, token)
        u = float(torch.rand((), generator=generator, device=q.device))
        if u * float(p[token]) < float(q[token]):
            out.append(token)
            continue
        residual = (q - p).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # q == p up to rounding: nothing to correct
            residual = q
        drawn = torch.multinomial(residual / residual.sum(), 1, generator=generator)
        return [*out, int(drawn)], i
    k = len(proposal.tokens)
    bonus = (
        argmax[k] if target is None else int(torch.multinomial(target[k], 1, generator=generator))
    )
    return [*out, bonus], k


def _point(like: torch.Tensor, token: int) -> torch.Tensor:
    p = torch.zeros_like(like)
    p[token] = 1.0
    return p
