"""How many tokens to speculate for each sequence: the scheduler's half of speculative
decoding (the runner's half proposes and verifies, :mod:`moegpt.serve.speculative`).

Pure Python over the scheduler's own state: per-sequence acceptance estimates, the step-time
model, the runner's measured costs of proposing and verifying, and a gate that measures
whether speculating is actually faster at each load level.
"""

from __future__ import annotations

from moegpt.config import ServeConfig
from moegpt.serve.cost import StepCostModel
from moegpt.serve.sequence import Sequence

# A new sequence's acceptance rate starts at 1/2; counts decay so the estimate follows the
# text (and drifts back towards trying again while a sequence does not speculate).
PRIOR_TESTED, PRIOR_ACCEPTED, DECAY = 2.0, 1.0, 0.8
SMOOTHING = 0.2  # weight of the newest measurement in the runner's cost averages


class SpeculationGate:
    """A measured check on the per-sequence choices: for each load level (decode batch size,
    by powers of two) it keeps the step seconds per generated token of steps that speculated
    and of steps that did not, and lets a level speculate only while that is clearly the
    faster (by ``MARGIN``, so noise does not flip it), probing the other side every
    ``PROBE_EVERY`` steps so neither figure goes stale. So a loaded server whose step-time
    model misjudges speculation still ends up at the faster mode."""

    PROBE_EVERY = 64
    MARGIN = 0.95

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
            seconds_per_token if old is None else old + SMOOTHING * (seconds_per_token - old)
        )


class LookaheadPolicy:
    """Chooses each decoding sequence's lookahead (0: no speculation) per ``serve.speculation``:
    fixed proposes ``spec_tokens``; adaptive the count with the best expected goodput."""

    def __init__(self, config: ServeConfig, draft_max_len: int | None = None) -> None:
        self.mode = config.speculation
        self.max_k = config.spec_tokens
        self.draft_max_len = draft_max_len
        self.draft_seconds_per_token = 0.0  # measured cost of proposing, per proposed token
        self.verify_seconds = 0.0  # measured host time of one sequence's verification
        self.gate = SpeculationGate()

    @staticmethod
    def acceptance(seq: Sequence) -> float:
        return (seq.spec_accepted + PRIOR_ACCEPTED) / (seq.spec_tested + PRIOR_TESTED)

    def plan(
        self, running: list[Sequence], cost: StepCostModel | None, max_context: int
    ) -> dict[int, int]:
        """Lookahead by seq_id for the running sequences that should speculate this step."""
        decoding = [s for s in running if s.pending == 1]
        if self.mode == "off":
            return {}
        level = SpeculationGate.bucket(len(decoding)) if decoding == running else None
        if self.mode == "adaptive" and not self.gate.allows(level):
            return {}
        wanted = {}
        for seq in decoding:
            if not seq.params.speculate:
                continue
            limit = min(
                self.max_k,
                seq.params.max_tokens - len(seq.output) - 1,
                max_context - seq.length,
            )
            if self.draft_max_len is not None:
                limit = min(limit, self.draft_max_len - seq.length)
            if limit <= 0:
                continue
            if self.mode == "fixed" or cost is None:
                wanted[seq.seq_id] = limit
            elif k := self._best_k(seq, limit, cost, len(decoding)):
                wanted[seq.seq_id] = k
            else:  # not testing: let the estimate drift back to the prior
                decay_acceptance(seq)
        return wanted

    def _best_k(self, seq: Sequence, limit: int, cost: StepCostModel, batch: int) -> int:
        """The lookahead with the most expected tokens per second of step time this sequence
        is charged (its share of the step plus what its extra tokens add; goodput as in
        SmartSpec, Liu et al. 2024): under load a verified token costs about as much as a
        decoded one, so speculation pays only while acceptance is high."""
        alpha = self.acceptance(seq)
        context = seq.length
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

    def learn(
        self,
        proposed: int,
        verified: int,
        propose_seconds: float,
        verify_seconds: float,
    ) -> None:
        """The runner's measured costs of a step's proposing and verifying."""
        if proposed:
            spent = propose_seconds / proposed
            self.draft_seconds_per_token += SMOOTHING * (spent - self.draft_seconds_per_token)
        if verified:
            spent = verify_seconds / verified
            self.verify_seconds += SMOOTHING * (spent - self.verify_seconds)

    def observe(
        self, decode_only: bool, batch: int, speculated: bool, seconds: float, tokens: int
    ) -> None:
        """Feed the gate a finished step: pure decode steps count, as speculative when some
        sequence verified proposed tokens."""
        if tokens and decode_only:
            self.gate.record(SpeculationGate.bucket(batch), speculated, seconds / tokens)


def record_acceptance(seq: Sequence, proposed: int, accepted: int) -> None:
    """Fold one verification into ``seq``'s acceptance estimate."""
    tested = accepted + (accepted < proposed)
    seq.spec_tested = seq.spec_tested * DECAY + tested
    seq.spec_accepted = seq.spec_accepted * DECAY + accepted


def decay_acceptance(seq: Sequence) -> None:
    """A decoding step without speculation: the estimate drifts back to the prior."""
    seq.spec_tested *= DECAY
    seq.spec_accepted *= DECAY
