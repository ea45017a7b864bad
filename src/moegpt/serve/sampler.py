"""Turning rows of logits into tokens: temperature, top-k, top-p, per-sequence seeded
generators, and log-probabilities of the raw model distribution (as OpenAI reports them).
A step's rows are drawn together on the device (:func:`sample_batch`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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

    Rows draw by :func:`race` (a seeded row's draw does not depend on what else is in the
    batch); an all-greedy batch is one argmax.
    """
    if all(p.greedy for p in params):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = race(batch_distribution(logits, params), generators)
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


def race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``probs`` by the exponential race, ``argmax(p / E)`` with
    ``E ~ Exp(1)`` per token, which picks token t with probability p_t: unseeded rows share
    one batched draw, seeded rows draw from their own generator."""
    noise = torch.empty_like(probs).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i].exponential_(generator=generator)
    # A draw of exactly 0 would make 0 / 0 = NaN, which argmax would pick, for a token of
    # probability 0 (a uniform of exactly 0 has chance 2**-24 per token in fp32).
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def accept(
    target: torch.Tensor,
    proposed: torch.Tensor,
    row_lengths: list[int],
    proposal_probs: torch.Tensor | None,
    generators: list[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative acceptance rule for a batch, on the device: (tokens (S, K + 1), -1
    past each row's end; accepted (S,)).

    ``target`` (S, K + 1, vocab) holds the target's sampling distributions q at the proposed
    positions and one past them; ``proposed`` (S, K) the proposed tokens, the first
    ``row_lengths`` of each row real (a seeded row draws that many uniforms from its
    generator, whatever the other rows propose, so that it reproduces); ``proposal_probs``
    (S, K, vocab) the distributions p they were drawn from (None: point masses, as n-grams
    propose). Token x at position i is accepted with probability min(1, q(x) / p(x)); at the
    first rejection a token is drawn from the normalised residual max(0, q - p) and the rest
    is discarded; if all pass, a bonus token is drawn from the row past them (Leviathan et
    al. 2023). Greedy rows (point masses q) accept exactly the target's argmax tokens.
    """
    rows, width = proposed.shape
    device = target.device
    lengths = torch.tensor(row_lengths, device=device)
    real = torch.arange(width, device=device) < lengths[:, None]
    if proposal_probs is None:
        proposal_probs = F.one_hot(proposed, target.shape[-1]).to(target.dtype)
    # p past each row's proposals is 0: the row after the last proposal is the bonus row
    p = torch.cat(
        [
            proposal_probs * real[..., None],
            proposal_probs.new_zeros(rows, 1, 1).expand(rows, 1, target.shape[-1]),
        ],
        dim=1,
    )
    q_x = target[:, :width].gather(2, proposed[..., None]).squeeze(-1)
    p_x = p[:, :width].gather(2, proposed[..., None]).squeeze(-1)
    uniform = torch.rand(rows, width, device=device)
    for i, generator in enumerate(generators):
        if generator is not None:
            n = row_lengths[i]
            uniform[i, :n] = torch.rand(n, device=device, generator=generator)
    kept = (uniform * p_x < q_x) & real
    accepted = kept.long().cumprod(dim=1).sum(dim=1)
    at = accepted[:, None, None].expand(rows, 1, target.shape[-1])
    q_j, p_j = target.gather(1, at).squeeze(1), p.gather(1, at).squeeze(1)
    residual = (q_j - p_j).clamp(min=0.0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0  # q == p up to rounding: nothing to fix
    last = race(torch.where(empty, q_j, residual), generators)
    span = torch.arange(width + 1, device=device)
    tokens = torch.cat([proposed, proposed.new_zeros(rows, 1)], dim=1)
    tokens = torch.where(span < accepted[:, None], tokens, -1)
    tokens = torch.where(span == accepted[:, None], last[:, None], tokens)
    return tokens, accepted


def verify_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    proposals: list[Proposal],
    generators: list[torch.Generator | None],
) -> list[list[Sampled]]:
    """What each sequence keeps of its proposal against the target's ``logits`` (S, K + 1,
    vocab; row i's rows past its proposal are ignored): the accepted tokens and the
    corrected or bonus one, with the log-probabilities it asks for. One batched draw on the
    device and one device-to-host copy."""
    rows, width = logits.shape[0], logits.shape[1] - 1
    device = logits.device
    flat = batch_distribution(
        logits.reshape(-1, logits.shape[-1]), [p for p in params for _ in range(width + 1)]
    )
    padded = [[*p.tokens, *[0] * (width - len(p.tokens))] for p in proposals]
    proposed = torch.tensor(padded, device=device)
    lengths = [len(p.tokens) for p in proposals]
    drawn = None
    if any(p.probs is not None for p in proposals):
        drawn = torch.zeros(rows, width, logits.shape[-1], device=device)
        for i, p in enumerate(proposals):
            drawn[i, : len(p.tokens)] = (
                p.probs
                if p.probs is not None
                else F.one_hot(proposed[i, : len(p.tokens)], logits.shape[-1]).float()
            )
    tokens, accepted = accept(flat.view(rows, width + 1, -1), proposed, lengths, drawn, generators)
    top = max((p.logprobs or 0 for p in params), default=0)
    parts = [accepted[:, None].float(), tokens.float()]
    if any(p.logprobs is not None for p in params):
        logprobs = logits.float().log_softmax(dim=-1)
        parts.append(logprobs.gather(2, tokens.clamp(min=0)[..., None]).squeeze(-1))
        if top:
            best = logprobs.topk(top, dim=-1)
            parts += [best.indices.float().flatten(1), best.values.flatten(1)]
    host = torch.cat(parts, dim=1).tolist()
    out = []
    for row, p in zip(host, params, strict=True):
        kept = int(row[0]) + 1
        ids = [int(t) for t in row[1 : 1 + kept]]
        if p.logprobs is None:
            out.append([Sampled(t) for t in ids])
            continue
        at = 2 + width
        chosen = row[at : at + kept]
        indices = row[at + width + 1 :][: (width + 1) * top]
        values = row[at + width + 1 + (width + 1) * top :]
        sampled = []
        for i, (token, logprob) in enumerate(zip(ids, chosen, strict=True)):
            pairs = list(
                zip(
                    indices[i * top : i * top + p.logprobs],
                    values[i * top : i * top + p.logprobs],
                    strict=True,
                )
            )
            sampled.append(Sampled(token, logprob, [(int(t), v) for t, v in pairs]))
        out.append(sampled)
    return out
