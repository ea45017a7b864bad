"""The step contract between the scheduler and the model runner: plain data only.

Every engine step is ``schedule() -> SchedulerOutput``, ``runner.execute(SchedulerOutput) ->
RunnerOutput``, ``scheduler.update(RunnerOutput)``. The scheduler owns every sequence's state
and is the only thing that changes it; the runner keeps what it needs to run the model
(each sequence's tokens, sampling generator and draft-cache length) and learns of sequences
and their ends only through these records. No live object crosses the boundary, so the
runner may run in another thread, process or rank, and both sides are testable alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from moegpt.serve.sampler import Sampled
from moegpt.serve.sequence import SamplingParams


@dataclass(frozen=True)
class NewSequence:
    """A sequence the runner has not seen: its prompt, how it samples, and with ``parent``
    a fork (another of an n > 1 request's samples) that starts from the parent's tokens and
    draws its first token from the parent's last row this step."""

    seq_id: int
    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int | None  # the sequence's own sampling seed (None: greedy)
    parent: int | None = None
    images: torch.Tensor | None = None  # (count, H, W) grey uint8, for a vision model


class ScheduledChunk(NamedTuple):
    """Run tokens ``start .. start + length`` of sequence ``seq_id`` (already in the runner's
    copy of its tokens), then, when ``sample``, draw its next token; the runner may first
    propose up to ``lookahead`` tokens and verify them in the same forward. ``table`` is what
    changed in the sequence's block table (which has room for the proposals) since the
    runner last saw it: (first changed block, the blocks from there to the end), or None.
    (A named tuple: a step makes one per sequence, and a frozen dataclass takes twice as long
    to build.)"""

    seq_id: int
    start: int
    length: int
    table: tuple[int, tuple[int, ...]] | None
    sample: bool
    lookahead: int = 0


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    new: list[NewSequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write blocks
    finished: list[int] = field(default_factory=list)  # sequences gone since the last step
    preempted: list[int] = field(default_factory=list)
    tokens: int = 0  # the chunks' tokens, proposals included (kept as they are added)
    predicted_s: float | None = None
    limited_by: str | None = None  # what stopped the step from growing
    over_bound: str | None = None  # why the step is predicted to exceed the latency target

    def add(self, chunk: ScheduledChunk) -> None:
        self.chunks.append(chunk)
        self.tokens += chunk.length + chunk.lookahead

    @property
    def keys(self) -> int:
        """Attention keys the step reads: new tokens times their context, summed."""
        return sum(
            (c.length + c.lookahead) * (c.start + c.length + c.lookahead) for c in self.chunks
        )


@dataclass
class RunnerOutput:
    """What the forward produced: the tokens each sampling sequence appends (1, or accepted
    proposals plus one), how many were proposed for it, and the runner's measured host costs
    of proposing and verifying (the lookahead policy prices speculation with them)."""

    sampled: dict[int, list[Sampled]] = field(default_factory=dict)
    proposed: dict[int, int] = field(default_factory=dict)
    # the prompt tokens' log-probabilities this step scored, per sequence, in prompt order
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)
    tokens_run: int = 0
    propose_seconds: float = 0.0
    verify_seconds: float = 0.0


@dataclass
class RequestOutput:
    """What one step produced for one sequence of a request: the scheduler's tokens, and
    once an :class:`~moegpt.serve.output.OutputProcessor` has seen them, their text."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None  # on the sequence's first output
    time_per_output_token: float | None = None  # when it finishes with two tokens or more
    # with SamplingParams.prompt_logprobs, on the first output: None for the first prompt
    # token, then each one's log-probability given those before it
    prompt_logprobs: list[float | None] | None = None
