"""Iteration-level continuous batching (pure Python; unit-tested without a model).

Every step the scheduler picks which sequences run and how many tokens each: running
sequences first in arrival order (decodes take one token, unfinished prefills a chunk), then
waiting ones while the step has room. A step is bounded by ``max_batch_size`` sequences,
``max_tokens_per_step`` tokens, free KV blocks and, with a time-per-output-token target, by a
cost model of step time: the step grows while the predicted time stays within the target, so
the batch is as large as the latency bound allows. When a running sequence needs a block and
none is free, the newest running sequence is preempted (its blocks freed; it is recomputed
when it runs again) rather than failing anything.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moegpt.serve.blocks import BlockAllocator
from moegpt.serve.sequence import Sequence, Status

# One measured step: (tokens, attention keys, sequences, seconds).
Sample = tuple[int, int, int, float]


@dataclass
class StepCostModel:
    """Predicted step seconds = base + per_token x tokens + per_key x attention keys read
    (sum over sequences of new tokens x their context) + per_sequence x sequences (the
    per-sequence attention calls and bookkeeping)."""

    base: float
    per_token: float
    per_key: float
    per_sequence: float = 0.0

    def predict(self, tokens: int, keys: int, sequences: int) -> float:
        return (
            self.base
            + self.per_token * tokens
            + self.per_key * keys
            + self.per_sequence * sequences
        )

    @classmethod
    def fit(cls, samples: list[Sample]) -> StepCostModel:
        """Non-negative least squares over measured steps (a coefficient that comes out
        negative is dropped and the rest refitted)."""
        a = np.array([[1.0, t, k, n] for t, k, n, _ in samples])
        y = np.array([s for *_, s in samples])
        active = list(range(4))
        coef = np.zeros(4)
        while active:
            solution = np.linalg.lstsq(a[:, active], y, rcond=None)[0]
            if (solution >= 0).all():
                coef[active] = solution
                break
            active.pop(int(np.argmin(solution)))
        return cls(*map(float, coef))


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 64
    max_tokens_per_step: int = 2048
    tpot_s: float | None = None  # time-per-output-token target (the step time of a decode)
    ttft_s: float | None = None  # time-to-first-token target: late prompts jump the bound


@dataclass
class Chunk:
    """Run tokens ``start .. start + length`` of ``seq`` this step."""

    seq: Sequence
    start: int
    length: int


@dataclass
class Plan:
    chunks: list[Chunk] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write blocks
    preempted: list[Sequence] = field(default_factory=list)
    predicted_s: float | None = None
    limited_by: str | None = None  # what stopped the step from growing
    over_bound: str | None = None  # why the step is predicted to exceed the latency target

    @property
    def tokens(self) -> int:
        return sum(c.length for c in self.chunks)


def _keys(start: int, length: int) -> int:
    return length * (start + length)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        allocator: BlockAllocator,
        cost: StepCostModel | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config
        self.allocator = allocator
        self.cost = cost
        # The share of the latency target steps are planned to: below 1 when the step-time
        # model's errors would otherwise push about half the full-size steps over the target.
        self.headroom = 1.0
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- bookkeeping ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Free a sequence's blocks; it leaves the running (or waiting) set."""
        seq.table.free()
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Cancel every sequence of a request, wherever it is."""
        gone = [s for s in [*self.running, *self.waiting] if s.request_id == request_id]
        for seq in gone:
            self.finish(seq, "abort")
        return gone

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run ``child`` (sharing ``parent``'s blocks) right after its parent."""
        child.status = Status.RUNNING
        self.running.insert(self.running.index(parent) + 1, child)

    def _preempt(self, seq: Sequence) -> None:
        seq.table.free()
        seq.computed = seq.draft_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)  # first to come back

    # -- the step ------------------------------------------------------------------------
    def _fit_latency(self, plan: Plan, keys: int, seq: Sequence, n: int) -> int:
        """The most of ``n`` tokens of ``seq`` the latency target allows this step."""
        target, cost = self.config.tpot_s, self.cost
        if target is None or cost is None:
            return n
        target *= self.headroom
        sequences = len(plan.chunks) + 1
        while (
            n > 0
            and cost.predict(plan.tokens + n, keys + _keys(seq.computed, n), sequences) > target
        ):
            n = n // 2 if n > 1 else 0
        return n

    def _late(self, seq: Sequence) -> bool:
        ttft = self.config.ttft_s
        return (
            ttft is not None
            and seq.first_token_at is None
            and (self.clock() - seq.arrival > ttft / 2)
        )

    def _take(self, plan: Plan, keys: int, seq: Sequence) -> int:
        """Tokens ``seq`` may run this step (0: the step is full); records why not."""
        if len(plan.chunks) >= self.config.max_batch_size:
            plan.limited_by = "batch size"
            return 0
        room = self.config.max_tokens_per_step - plan.tokens
        # A decode may also verify the tokens proposed for it (speculative decoding); they
        # are the first thing the token budget and the latency bound cut.
        n = min(seq.pending + (seq.lookahead if seq.pending == 1 else 0), room)
        if n <= 0:
            plan.limited_by = "token budget"
            return 0
        fitted = self._fit_latency(plan, keys, seq, n)
        if fitted == 0:
            if plan.chunks and not self._late(seq):
                plan.limited_by = "latency bound"
                return 0
            # progress first: a step always runs something, and a late prompt is admitted
            plan.over_bound = "time-to-first-token" if plan.chunks else "one token exceeds it"
            fitted = 1
        return fitted

    def schedule(self) -> Plan:
        plan = Plan()
        keys = 0
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            n = self._take(plan, keys, seq)
            if n == 0:
                break
            needed = seq.table.extra_blocks(seq.computed, seq.computed + n)
            if needed > self.allocator.free and n > seq.pending:
                n = seq.pending  # speculative room never costs another sequence its blocks
                needed = seq.table.extra_blocks(seq.computed, seq.computed + n)
            while needed > self.allocator.free and seq.status is Status.RUNNING:
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim)
            if seq.status is not Status.RUNNING:  # it was the newest: preempted itself
                break
            plan.copies += seq.table.grow(seq.computed, seq.computed + n)
            plan.chunks.append(Chunk(seq, seq.computed, n))
            keys += _keys(seq.computed, n)
            index += 1
        while self.waiting and not plan.preempted:
            seq = self.waiting[0]
            n = self._take(plan, keys, seq)
            if n == 0:
                break
            if seq.table.extra_blocks(seq.computed, seq.computed + n) > self.allocator.free:
                plan.limited_by = "kv blocks"
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.copies += seq.table.grow(seq.computed, seq.computed + n)
            plan.chunks.append(Chunk(seq, seq.computed, n))
            keys += _keys(seq.computed, n)
        if self.cost is not None:
            plan.predicted_s = self.cost.predict(plan.tokens, keys, len(plan.chunks))
        return plan
