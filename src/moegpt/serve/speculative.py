"""Speculative decoding: proposers guess a few tokens ahead, the target model scores them all
in one forward, and :func:`verify` keeps a prefix of them such that the output distribution is
exactly the target's (Leviathan et al. 2023, Chen et al. 2023).

Two proposers: :class:`NgramProposer` (prompt lookup: the tokens that followed the latest
earlier occurrence of the sequence's last n-gram; no model) and :class:`DraftProposer` (a
smaller model with its own paged cache laid out on the target's block tables, so the draft
needs no block manager of its own and a rollback is a shorter ``draft_computed``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from moegpt.config import ServeConfig
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.serve.runner import ModelInput, ModelRunner, build_runner
from moegpt.serve.sampler import distribution
from moegpt.serve.scheduler import Chunk, StepCostModel
from moegpt.serve.sequence import Sequence


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


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (longest n first, ``max_n`` down to ``min_n``) and propose what followed it."""

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """No cache to keep in step with the target's."""

    def propose(self, requests: list[tuple[Sequence, int]]) -> list[Proposal]:
        return [Proposal(self._lookup(seq.tokens, k)) for seq, k in requests]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        arr = np.asarray(tokens)
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            windows = sliding_window_view(arr[:-1], n)  # every earlier n-gram
            hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start : start + k].tolist()
        return []


class DraftProposer:
    """A smaller model proposing k tokens in k batched forwards: the first catches each
    sequence's draft cache up with its accepted tokens and draws the first proposal, each
    further one extends the proposals by a token. Its cache has the target cache's block
    geometry and is addressed through the target's block tables."""

    def __init__(self, draft: Transformer, config: ServeConfig, num_blocks: int) -> None:
        self.model = draft.eval()
        self.runner: ModelRunner = build_runner(
            draft, _with_blocks(config, num_blocks), tp_group=None
        )

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply the target's copy-on-write copies to the draft cache too."""
        self.runner.cache.copy_blocks(copies)

    @torch.inference_mode()
    def propose(self, requests: list[tuple[Sequence, int]]) -> list[Proposal]:
        tokens: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        for round_ in range(max((k for _, k in requests), default=0)):
            active = [i for i, (_, k) in enumerate(requests) if k > round_]
            inp = ModelInput()
            for i in active:
                seq = requests[i][0]
                context = seq.tokens + tokens[i]
                begin = seq.draft_computed if round_ == 0 else len(context) - 1
                offset = len(inp.tokens)
                inp.tokens += context[begin:]
                inp.positions += list(range(begin, len(context)))
                slots = seq.table.slots(0, len(context))
                inp.sequences.append((offset, len(context) - begin, begin, slots))
                inp.logits_rows.append(len(inp.tokens) - 1)
                seq.draft_computed = len(context)
            logits = self.runner.execute(inp)
            for i, row in zip(active, logits, strict=True):
                seq = requests[i][0]
                p = distribution(row, seq.params)
                token = (
                    int(p.argmax())
                    if seq.params.greedy
                    else int(torch.multinomial(p, 1, generator=seq.generator))
                )
                tokens[i].append(token)
                probs[i].append(p)
        return [
            Proposal(t, torch.stack(p) if p else None) for t, p in zip(tokens, probs, strict=True)
        ]


def _with_blocks(config: ServeConfig, num_blocks: int) -> ServeConfig:
    return replace(config, num_kv_blocks=num_blocks, tp=1)


def check_draft(target: Transformer, draft: Transformer) -> None:
    """The draft must have the target's vocabulary size (the folders' tokenizers are compared
    by :func:`moegpt.serve.engine.load_draft`)."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise UserError(
            f"serve.draft: vocabulary of {draft.config.vocab_size} tokens, the target has "
            f"{target.config.vocab_size}; a draft needs the target's tokenizer"
        )


@dataclass
class SpecStats:
    """Speculation counters (reported in the engine's stats and the server's /metrics)."""

    proposed: int = 0
    accepted: int = 0
    verifications: int = 0  # sequence-steps that verified at least one proposed token
    proposed_at: list[int] = field(default_factory=list)  # by position 1..k
    accepted_at: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Proposed tokens accepted per verification (the bonus token not counted)."""
        return self.accepted / self.verifications if self.verifications else 0.0

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.verifications += 1
        grow = proposed - len(self.proposed_at)
        if grow > 0:
            self.proposed_at += [0] * grow
            self.accepted_at += [0] * grow
        for i in range(proposed):
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < accepted


# A new sequence's acceptance rate starts at 1/2; counts decay so the estimate follows the
# text (and drifts back towards trying again while a sequence does not speculate).
PRIOR_TESTED, PRIOR_ACCEPTED, DECAY = 2.0, 1.0, 0.8


class SpeculationGate:
    """A measured check on the per-sequence choices: for each load level (decode batch size,
    by powers of two) it keeps the step seconds per generated token of steps that speculated
    and of steps that did not, and lets a level speculate only while that is clearly the
    faster (by ``MARGIN``, so noise does not flip it), probing the other side every
    ``PROBE_EVERY`` steps so neither figure goes stale. So a loaded server whose step-time
    model misjudges speculation still ends up at the faster mode."""

    PROBE_EVERY = 64
    MARGIN = 0.95
    SMOOTHING = 0.2

    def __init__(self) -> None:
        self.seconds_per_token: dict[tuple[int, bool], float] = {}
        self._steps: dict[int, int] = {}

    @staticmethod
    def bucket(batch: int) -> int:
        return batch.bit_length()

    def allows(self, bucket: int | None) -> bool:
        if bucket is None:
            return True
        step = self._steps[bucket] = self._steps.get(bucket, 0) + 1
        spec, plain = (self.seconds_per_token.get((bucket, s)) for s in (True, False))
        if plain is None or spec is None:  # measure both sides first
            return plain is not None
        faster = spec <= self.MARGIN * plain
        return faster != (step % self.PROBE_EVERY == 0)  # probe the other side now and then

    def record(self, bucket: int, speculated: bool, seconds_per_token: float) -> None:
        key = (bucket, speculated)
        old = self.seconds_per_token.get(key)
        self.seconds_per_token[key] = (
            seconds_per_token if old is None else old + self.SMOOTHING * (seconds_per_token - old)
        )


class Speculator:
    """Chooses each sequence's lookahead, runs the proposer, verifies the target's rows."""

    def __init__(
        self,
        proposer: NgramProposer | DraftProposer,
        config: ServeConfig,
        draft_max_len: int | None = None,
    ) -> None:
        self.proposer = proposer
        self.mode = config.speculation
        self.max_k = config.spec_tokens
        self.draft_max_len = draft_max_len
        self.draft_seconds_per_token = 0.0  # measured cost of proposing, per proposed token
        self.verify_seconds = 0.0  # measured host time of one sequence's verification
        self.gate = SpeculationGate()

    def acceptance(self, seq: Sequence) -> float:
        return (seq.spec_accepted + PRIOR_ACCEPTED) / (seq.spec_tested + PRIOR_TESTED)

    def plan_lookahead(
        self, running: list[Sequence], cost: StepCostModel | None, max_context: int
    ) -> None:
        """Set ``seq.lookahead`` for every running sequence (0: no speculation)."""
        decoding = [s for s in running if s.pending == 1]
        for seq in running:
            seq.lookahead = 0
        if self.mode == "off":
            return
        level = SpeculationGate.bucket(len(decoding)) if decoding == running else None
        if self.mode == "adaptive" and not self.gate.allows(level):
            return
        for seq in decoding:
            if not seq.params.speculate:
                continue
            limit = min(
                self.max_k,
                seq.params.max_tokens - len(seq.output) - 1,
                max_context - len(seq.tokens),
            )
            if self.draft_max_len is not None:
                limit = min(limit, self.draft_max_len - len(seq.tokens))
            if limit <= 0:
                continue
            if self.mode == "fixed" or cost is None:
                seq.lookahead = limit
            else:
                seq.lookahead = self._best_k(seq, limit, cost, len(decoding))
            if seq.lookahead == 0:  # not testing: let the estimate drift back to the prior
                seq.spec_tested *= DECAY
                seq.spec_accepted *= DECAY

    def observe(
        self, chunks: list[Chunk], proposals: dict[int, Proposal], seconds: float, tokens: int
    ) -> None:
        """Feed the gate a finished step: pure decode steps count, as speculative when some
        sequence verified proposed tokens."""
        if tokens and all(c.length == 1 or c.seq.seq_id in proposals for c in chunks):
            self.gate.record(SpeculationGate.bucket(len(chunks)), bool(proposals), seconds / tokens)

    def _best_k(self, seq: Sequence, limit: int, cost: StepCostModel, batch: int) -> int:
        """The lookahead with the most expected tokens per second of step time this sequence
        is charged (its share of the step plus what its extra tokens add; goodput as in
        SmartSpec, Liu et al. 2024): under load a verified token costs about as much as a
        decoded one, so speculation pays only while acceptance is high."""
        alpha = self.acceptance(seq)
        context = len(seq.tokens)
        share = cost.predict(batch, batch * context, batch) / batch
        # Speculating at all costs a verification and an attention call of its own (the
        # sequence leaves the padded decode batch); each proposed token adds its compute.
        fixed = self.verify_seconds + cost.per_sequence
        extra = cost.per_token + cost.per_key * context + self.draft_seconds_per_token
        best_k, best = 0, 1.0 / share
        expected = 1.0
        for k in range(1, limit + 1):
            expected += alpha**k  # E[tokens] = 1 + alpha + ... + alpha^k
            goodput = expected / (share + fixed + k * extra)
            if goodput > best:
                best_k, best = k, goodput
        return best_k

    def propose(self, chunks: list[Chunk], copies: list[tuple[int, int]]) -> dict[int, Proposal]:
        """Proposals for the decode chunks the scheduler gave room to verify; a chunk whose
        proposal came out shorter shrinks to it."""
        self.proposer.copy_blocks(copies)
        wanted = [(c.seq, c.length - 1) for c in chunks if c.seq.pending == 1 and c.length > 1]
        if not wanted:
            return {}
        start = time.perf_counter()
        proposals = self.proposer.propose(wanted)
        proposed = sum(len(p.tokens) for p in proposals)
        if proposed:
            spent = (time.perf_counter() - start) / proposed
            self.draft_seconds_per_token += 0.2 * (spent - self.draft_seconds_per_token)
        by_seq = {}
        for chunk in chunks:
            if chunk.seq.pending == 1 and chunk.length > 1:
                proposal = proposals[len(by_seq)]
                chunk.length = 1 + len(proposal.tokens)
                # give back the blocks reserved for proposals that did not come
                chunk.seq.table.truncate(chunk.start + chunk.length)
                by_seq[chunk.seq.seq_id] = proposal
        return {sid: p for sid, p in by_seq.items() if p.tokens}

    def accept(
        self,
        seq: Sequence,
        rows: torch.Tensor,
        argmax: list[int],
        proposal: Proposal,
        stats: SpecStats,
    ) -> list[int]:
        """Verify ``proposal`` against the target's ``rows`` (k + 1, vocab); the tokens to
        append. Rolls the draft cache back to the accepted prefix."""
        start = time.perf_counter()
        params = seq.params
        target = None if params.greedy else torch.stack([distribution(r, params) for r in rows])
        tokens, accepted = verify(target, argmax, proposal, seq.generator)
        self.verify_seconds += 0.2 * (time.perf_counter() - start - self.verify_seconds)
        k = len(proposal.tokens)
        stats.record(k, accepted)
        tested = accepted + (accepted < k)
        seq.spec_tested = seq.spec_tested * DECAY + tested
        seq.spec_accepted = seq.spec_accepted * DECAY + accepted
        # The draft cached the proposals before the last; keep what the target accepted.
        seq.draft_computed = min(seq.draft_computed, len(seq.tokens) + accepted)
        return tokens
