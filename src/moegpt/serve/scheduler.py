"""Iteration-level continuous batching (pure Python; unit-tested without a model).

Every step the scheduler picks which sequences run and how many tokens each (``schedule()``
returns a plain :class:`~moegpt.serve.step.SchedulerOutput`), and after the runner ran it,
takes in what came out (``update()``): appended tokens, speculative rollback, finishing. It
owns every sequence's state; nothing else changes it. A step may be planned before the one
before it is taken in (the engine overlaps the host's planning with the device's work): a
sequence's token still being drawn is then scheduled as its next input. Running
sequences first in arrival order (decodes take one token, unfinished prefills a chunk), then
waiting ones while the step has room. A step is bounded by ``max_batch_size`` sequences,
``max_tokens_per_step`` tokens, free KV blocks and, with a time-per-output-token target, by a
cost model of step time: the step grows while the predicted time stays within the target, so
the batch is as large as the latency bound allows. A prefill step that cannot fit the target
(on a GPU it leaves the decode graphs, a fixed cost of several targets) spends the time decode
steps banked under it, so prompts join in batches every few steps and the mean step time
that each sequence's time per output token averages stays within the target. When a
running sequence needs a block and none is free, the newest running sequence is preempted
(its blocks freed; it is recomputed when it runs again) rather than failing anything.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from moegpt.serve.blocks import BlockAllocator
from moegpt.serve.cost import Sample, StepCostModel
from moegpt.serve.lookahead import LookaheadPolicy, record_acceptance
from moegpt.serve.sampler import Sampled
from moegpt.serve.sequence import Sequence, Status
from moegpt.serve.step import (
    NewSequence,
    RequestOutput,
    RunnerOutput,
    ScheduledChunk,
    SchedulerOutput,
)

REFIT_EVERY = 32  # steps between refits of the step-time model from measured steps


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 64
    max_tokens_per_step: int = 2048
    tpot_s: float | None = None  # time-per-output-token target (the step time of a decode)
    ttft_s: float | None = None  # time-to-first-token target: late prompts jump the bound


def _keys(start: int, length: int) -> int:
    return length * (start + length)


# Time banked by decode steps that ran under the latency target, capped at this many targets:
# enough to pay for a prefill step many targets long, not so much that a burst of them follows
# a long quiet spell.
SLACK_TARGETS = 16


def _decodes(out: SchedulerOutput) -> bool:
    """Whether the step decodes for someone: its time is then somebody's time per token."""
    return any(c.length == 1 and c.sample for c in out.chunks)


def mixed_step(out: SchedulerOutput) -> bool:
    """Whether the step runs more than one-token decodes (see :class:`StepCostModel`)."""
    return any(c.length != 1 or c.lookahead or not c.sample for c in out.chunks)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        allocator: BlockAllocator,
        cost: StepCostModel | None = None,
        clock: Callable[[], float] = time.perf_counter,
        max_context: int | None = None,
        eos_id: int | None = None,
        lookahead: LookaheadPolicy | None = None,
    ) -> None:
        self.config = config
        self.allocator = allocator
        self.cost = cost
        # The share of the latency target steps are planned to: below 1 when the step-time
        # model's errors would otherwise push about half the full-size steps over the target.
        self.headroom = 1.0
        # Seconds decode steps ran under the target (negative: over it), which steps that
        # leave the decode graphs for a prefill may spend: on a GPU such a step costs several
        # targets whatever its size, so prompts join in batches every few steps and every
        # sequence's time per token stays within the target on average (what TPOT measures).
        self.slack = 0.0
        # What the steps planned but not yet taken in are predicted to spend of it (with
        # overlap the next step is planned while the last one runs): spent once, not twice.
        self._committed: dict[int, float] = {}
        self.clock = clock
        self.max_context = max_context
        self.eos_id = eos_id
        self.lookahead = lookahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._live: dict[int, Sequence] = {}  # every sequence not finished, by id
        self._gone: list[int] = []  # finished since the last step: the runner forgets them
        self._seq_ids = itertools.count()  # forks get theirs here too: ids never collide
        # Step-time samples: the start-up calibration's span every shape; recent steps track
        # the machine as it runs. Both feed each refit.
        self.calibration: list[Sample] = []
        self._cost_samples: deque[Sample] = deque(maxlen=256)
        self._steps = 0

    # -- bookkeeping ---------------------------------------------------------------------
    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._live[seq.seq_id] = seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Free a sequence's blocks; it leaves the running (or waiting) set."""
        if seq.status is Status.FINISHED:
            return
        seq.table.free()
        seq.status, seq.finish_reason = Status.FINISHED, reason
        del self._live[seq.seq_id]
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.announced:
            self._gone.append(seq.seq_id)

    def abort(self, request_id: str) -> list[Sequence]:
        """Cancel every sequence of a request, wherever it is."""
        gone = [s for s in [*self.running, *self.waiting] if s.request_id == request_id]
        for seq in gone:
            self.finish(seq, "abort")
        return gone

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """Sample ``index`` of an n > 1 request: shares ``parent``'s blocks, runs right after
        it, and draws its first token from the parent's last row (scheduled this step)."""
        child = Sequence(
            self.new_seq_id(),
            parent.request_id,
            index,
            parent.prompt,
            parent.params,
            parent.table.fork(),
            seed=None if parent.seed is None else parent.seed + index,
            computed=parent.computed,
            in_flight=1,
            arrival=parent.arrival,
            status=Status.RUNNING,
            images=parent.images,
        )
        self._live[child.seq_id] = child
        self.running.insert(self.running.index(parent) + index, child)
        return child

    def _preempt(self, seq: Sequence) -> None:
        seq.table.free()
        seq.computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)  # first to come back

    # -- the step ------------------------------------------------------------------------
    def _fit_latency(self, out: SchedulerOutput, keys: int, seq: Sequence, n: int) -> int:
        """The most of ``n`` tokens of ``seq`` the latency target allows this step."""
        target, cost = self.config.tpot_s, self.cost
        if target is None or cost is None:
            return n
        limit = target * self.headroom
        sequences = len(out.chunks) + 1
        if seq.status is Status.WAITING:
            # Admitted, it decodes every step from its first token on: the decode step of the
            # step's sequences (it included) must fit the target by itself.
            contexts = sum(c.start + c.length + 1 for c in out.chunks) + seq.length + 1
            if cost.predict(sequences, contexts, sequences) > limit:
                return 0
        # Nobody decoding: a prefill step is nobody's time per token.
        stake = any(s.computed >= len(s.prompt) for s in self.running if s is not seq)
        while n > 0:
            step_keys = keys + _keys(seq.computed, n)
            mixed = mixed_step(out) or not (n == 1 and seq.pending == 1)
            predicted = cost.predict(out.tokens + n, step_keys, sequences, mixed)
            if predicted <= limit:
                break
            if mixed and (not stake or predicted <= limit + self.banked()):
                out.over_bound = out.over_bound or (
                    "spending slack banked under it" if stake else "nobody decoding"
                )
                break
            n = n // 2 if n > 1 else 0
        return n

    def discard(self, out: SchedulerOutput) -> None:
        """Forget a step that failed before its results came in: it spends no slack."""
        self._committed.pop(id(out), None)

    def banked(self) -> float:
        """The slack a step planned now may spend: what decode steps banked, less what the
        steps still running are predicted to spend of it."""
        return self.slack - sum(self._committed.values())

    def _late(self, seq: Sequence) -> bool:
        ttft = self.config.ttft_s
        return (
            ttft is not None
            and seq.first_token_at is None
            and (self.clock() - seq.arrival > ttft / 2)
        )

    def _take(self, out: SchedulerOutput, keys: int, seq: Sequence, lookahead: int) -> int:
        """Tokens ``seq`` may run this step (0: the step is full); records why not."""
        if len(out.chunks) >= self.config.max_batch_size:
            out.limited_by = "batch size"
            return 0
        room = self.config.max_tokens_per_step - out.tokens
        # A decode may also verify the tokens proposed for it (speculative decoding); they
        # are the first thing the token budget and the latency bound cut.
        pending = seq.pending
        n = min(pending + (lookahead if pending == 1 else 0), room)
        if n <= 0:
            out.limited_by = "token budget"
            return 0
        fitted = self._fit_latency(out, keys, seq, n)
        if fitted == 0 and seq.status is Status.RUNNING and pending == 1:
            # A running sequence decodes every step: the target limits how many run (the
            # admissions), never which of them wait a step, which would double their TPOT.
            out.over_bound = "running decodes exceed it"
            return 1
        if fitted == 0:
            if out.chunks and not self._late(seq):
                out.limited_by = "latency bound"
                return 0
            # Progress first: a step always runs something, and a late prompt is admitted.
            # A step the target cannot hold even with one token runs the whole chunk: cutting
            # it would add steps, each over the target, and never meet it.
            out.over_bound = "time-to-first-token" if out.chunks else "one token exceeds it"
            fitted = 1 if out.chunks else n
        return fitted

    def _place(self, out: SchedulerOutput, seq: Sequence, n: int) -> list[int]:
        """Grow ``seq``'s table for ``n`` tokens (speculative ones past its pending tokens
        included), add its chunk, and count its tokens computed and its draw in flight from
        now on; an n > 1 prompt that ends here forks its other samples (their ids return)."""
        start, pending = seq.computed, seq.pending
        copies = seq.table.grow(start, start + n)
        if copies:
            out.copies += copies
        length = min(n, pending)
        # A prompt scored alone (max_tokens 0) ends with its last chunk: nothing is drawn.
        sample = length == pending and seq.params.max_tokens > 0
        self._announce(out, seq)
        table = seq.table.changes()
        out.add(ScheduledChunk(seq.seq_id, start, length, table, sample, n - length))
        seq.computed += length
        seq.in_flight += sample
        forks = []
        # The first sample of an n > 1 request forks when its prompt's last chunk is placed
        # (its first token may still be in flight when it runs again: no second fork then).
        if sample and seq.params.n > 1 and seq.index == 0 and seq.computed == len(seq.prompt):
            for index in range(1, seq.params.n):
                child = self._fork(seq, index)
                self._announce(out, child, parent=seq.seq_id)
                table = child.table.changes()
                out.add(ScheduledChunk(child.seq_id, seq.computed, 0, table, True))
                forks.append(child.seq_id)
        return forks

    def _announce(self, out: SchedulerOutput, seq: Sequence, parent: int | None = None) -> None:
        if not seq.announced:
            seq.announced = True
            prompt = tuple(seq.prompt)
            out.new.append(
                NewSequence(seq.seq_id, prompt, seq.params, seq.seed, parent, seq.images)
            )

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        wanted = {}
        if self.lookahead is not None:
            context = self.max_context or float("inf")
            wanted = self.lookahead.plan(self.running, self.cost, context)
        keys = 0
        index = 0
        forked: set[int] = set()
        while index < len(self.running):
            seq = self.running[index]
            if seq.seq_id in forked or self._ends_in_flight(seq) or seq.pending == 0:
                # placed with its parent; or its draw in flight is its last; or nothing to
                # run (a scored prompt's last chunk in flight): the others still run
                index += 1
                continue
            n = self._take(out, keys, seq, wanted.get(seq.seq_id, 0))
            if n == 0 and out.limited_by == "latency bound":
                index += 1  # a prompt chunk waits; the decodes after it still run
                continue
            if n == 0:
                break
            needed = seq.table.extra_blocks(seq.computed, seq.computed + n)
            if needed > self.allocator.free and n > seq.pending:
                n = seq.pending  # speculative room never costs another sequence its blocks
                needed = seq.table.extra_blocks(seq.computed, seq.computed + n)
            while needed > self.allocator.free and seq.status is Status.RUNNING:
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.seq_id)
                # a preempted fork no longer shares seq's last block: no copy needed then
                needed = seq.table.extra_blocks(seq.computed, seq.computed + n)
            if seq.status is not Status.RUNNING:  # it was the newest: preempted itself
                break
            keys += _keys(seq.computed, n)
            forked.update(self._place(out, seq, n))
            index += 1
        occupied = sum(map(_samples, self.running))
        while self.waiting and not out.preempted:
            # Running sequences this step skips (cut by the bound, or ending in flight) still
            # hold their place: images kept and KV reserved for max_batch_size at most, an
            # n > 1 request's samples counted from its admission. (One with n above the
            # limit is admitted alone, or it never would be.)
            seq = self.waiting[0]
            if occupied and occupied + _samples(seq) > self.config.max_batch_size:
                out.limited_by = "batch size"
                break
            n = self._take(out, keys, seq, 0)
            if n == 0:
                break
            if seq.table.extra_blocks(seq.computed, seq.computed + n) > self.allocator.free:
                out.limited_by = "kv blocks"
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            occupied += _samples(seq)
            keys += _keys(seq.computed, n)
            self._place(out, seq, n)  # its forks come after it: the running loop is done
        if self.cost is not None:
            out.predicted_s = self.cost.predict(out.tokens, keys, len(out.chunks), mixed_step(out))
            target = self.config.tpot_s
            if target is not None and _decodes(out) and out.predicted_s > target:
                # Only spending counts: time a step in flight may bank is not there yet.
                self._committed[id(out)] = out.predicted_s - target
        if out.chunks:  # the runner hears of ended sequences only with a step it runs
            out.finished, self._gone = self._gone, []
        return out

    # -- what came out -------------------------------------------------------------------
    def update(
        self, out: SchedulerOutput, result: RunnerOutput, seconds: float | None = None
    ) -> list[RequestOutput]:
        """Take in a step's results: computed tokens, drawn tokens (stops applied, rejected
        speculative room given back), finished sequences' blocks freed. ``seconds``, the
        step's measured time, trains the step-time model. Returns what each sampled
        sequence gained."""
        outputs = []
        now = self.clock()
        self._committed.pop(id(out), None)
        for chunk in out.chunks:
            seq = self._live.get(chunk.seq_id)
            if seq is None:  # it ended meanwhile
                continue
            seq.prompt_logprobs += result.prompt_logprobs.get(chunk.seq_id, ())
            drawn = result.sampled.get(chunk.seq_id)
            if drawn is None:  # a prefill chunk, or a scored prompt's last
                # (a preempted sequence recomputing past its prompt is not done there)
                ends_prompt = chunk.start + chunk.length == len(seq.prompt)
                if ends_prompt and not chunk.sample and seq.params.max_tokens == 0:
                    outputs.append(self._scored(seq, now))
                continue
            seq.in_flight -= 1
            # The cache keeps the chunk and the accepted proposals; the bonus token is next.
            # (A sequence preempted meanwhile recomputes everything from the start.)
            if seq.status is Status.RUNNING:
                seq.computed += len(drawn) - 1
            proposed = result.proposed.get(chunk.seq_id, 0)
            if proposed:
                record_acceptance(seq, proposed, len(drawn) - 1)
            outputs.append(self._append(seq, drawn, now, chunk.lookahead > 0))
        if seconds is not None:
            self._learn(out, result, seconds)
        return outputs

    def _scored(self, seq: Sequence, now: float) -> RequestOutput:
        """A prompt scored alone (max_tokens 0) is done once its last chunk ran."""
        self.finish(seq, "length")
        return RequestOutput(
            seq.request_id,
            seq.index,
            [],
            finished=True,
            finish_reason="length",
            prompt_tokens=len(seq.prompt),
            time_to_first_token=now - seq.arrival,
            prompt_logprobs=[None, *seq.prompt_logprobs],
        )

    def _append(
        self, seq: Sequence, drawn: list[Sampled], now: float, speculated: bool
    ) -> RequestOutput:
        """Append drawn tokens until one ends the sequence; with ``speculated``, give back
        the room of the proposals it rejected."""
        first = seq.first_token_at is None
        if first:
            seq.first_token_at = now
        appended: list[Sampled] = []
        reason = None
        for sampled in drawn:
            reason = self._stop_reason(seq, sampled.token)
            if reason == "stop":
                break
            seq.output.append(sampled.token)
            appended.append(sampled)
            if reason is not None:
                break
        tpot = None
        if reason is not None:
            self.finish(seq, reason)
            if len(seq.output) > 1:
                tpot = (now - seq.first_token_at) / (len(seq.output) - 1)
        elif speculated:  # the room of rejected proposals goes back
            seq.table.truncate(seq.length + seq.in_flight)
        return RequestOutput(
            seq.request_id,
            seq.index,
            [s.token for s in appended],
            logprobs=[s.as_dict() for s in appended if s.logprob is not None],
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.output),
            time_to_first_token=now - seq.arrival if first else None,
            time_per_output_token=tpot,
            # the request's prompt is scored once, by its first sample
            prompt_logprobs=(
                [None, *seq.prompt_logprobs]
                if first and seq.params.prompt_logprobs and seq.index == 0
                else None
            ),
        )

    def _ends_in_flight(self, seq: Sequence) -> bool:
        """Whether a token being drawn for ``seq`` is sure to end it (its length limits)."""
        return bool(seq.in_flight) and (
            len(seq.output) + seq.in_flight >= seq.params.max_tokens
            or (self.max_context is not None and seq.length + seq.in_flight >= self.max_context)
        )

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        """Why ``token`` ends ``seq``: "stop" (an end token, not appended), "length" (the
        last token that fits, appended), or None."""
        params = seq.params
        if token in params.stop_token_ids or (token == self.eos_id and not params.ignore_eos):
            return "stop"
        if len(seq.output) + 1 >= params.max_tokens:
            return "length"
        if self.max_context is not None and seq.length + 1 >= self.max_context:
            return "length"
        return None

    def _learn(self, out: SchedulerOutput, result: RunnerOutput, seconds: float) -> None:
        """Train the step-time model, the latency headroom and the lookahead policy on a
        measured step."""
        self._steps += 1
        sample = (result.tokens_run, out.keys, len(out.chunks), int(mixed_step(out)), seconds)
        self._cost_samples.append(sample)
        target = self.config.tpot_s
        if target is not None:
            if _decodes(out):
                cap = SLACK_TARGETS * target
                self.slack = min(cap, max(-cap, self.slack + target - seconds))
            self._adjust_headroom(out, seconds, target)
            if self._steps % REFIT_EVERY == 0 and len(self._cost_samples) > 8:
                self.cost = StepCostModel.fit(self.calibration + list(self._cost_samples))
        if self.lookahead is not None:
            generated = sum(len(t) for t in result.sampled.values())
            proposed = sum(result.proposed.values())
            self.lookahead.learn(
                proposed, len(result.proposed), result.propose_seconds, result.verify_seconds
            )
            decode_only = all(c.length == 1 and c.sample for c in out.chunks)
            self.lookahead.observe(decode_only, len(out.chunks), proposed > 0, seconds, generated)

    def _adjust_headroom(self, out: SchedulerOutput, elapsed: float, target: float) -> None:
        """Plan steps tighter after one the model let run over (5% each), relax slowly
        (0.5% a step) while steps land under the target."""
        if out.over_bound or out.predicted_s is None:
            return
        if elapsed > target:
            self.headroom = max(0.5, self.headroom * 0.95)
        else:
            self.headroom = min(1.0, self.headroom * 1.005)


def _samples(seq: Sequence) -> int:
    """Sequences ``seq`` stands for in the batch: the first sample of an n > 1 request that
    has not forked yet (no token drawn or in flight) brings its n - 1 forks with it."""
    unforked = seq.index == 0 and not seq.output and not seq.in_flight
    return seq.params.n if unforked else 1
