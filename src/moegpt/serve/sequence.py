"""Requests and the sequences the scheduler moves between waiting, running and finished."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moegpt.errors import UserError
from moegpt.serve.blocks import BlockTable

if TYPE_CHECKING:
    import torch

SEED_LIMIT = 2**63 - 1024


GREEDY_BELOW = 1e-5  # temperatures this small sample the argmax anyway (vLLM's bound too)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (OpenAI's names): a temperature below ``GREEDY_BELOW`` is greedy
    (logits over a tiny temperature overflow to inf, and their softmax to NaN); ``top_k`` 0 and
    ``top_p`` 1 are off; ``seed`` makes sampling reproducible (with speculation, only with a
    fixed lookahead: adaptive lookahead depends on measured step times, and the proposals
    draw from the same generator); ``logprobs`` N returns each chosen token's log-probability
    and the N most likely alternatives."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    # the log-probability of each prompt token after the first, given those before it
    # (scoring, perplexity; OpenAI's echo with logprobs); with max_tokens 0 nothing is drawn
    prompt_logprobs: bool = False
    speculate: bool = True  # may the engine speculate for this request (when it can)

    def __post_init__(self) -> None:
        checks = [
            (
                "max_tokens",
                self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs),
                "must be >= 1 (0 only with prompt_logprobs: score the prompt alone)",
            ),
            (
                "temperature",
                math.isfinite(self.temperature) and self.temperature >= 0,
                "must be a finite number >= 0",
            ),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("n", self.n >= 1, "must be >= 1"),
            ("n", self.n == 1 or self.max_tokens > 0, "must be 1 when max_tokens is 0"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in 0..20"),
            # sample i of a request draws with seed + i: keep every one a valid 64-bit seed
            (
                "seed",
                self.seed is None or 0 <= self.seed < SEED_LIMIT,
                f"must be in 0..{SEED_LIMIT - 1}",
            ),
            ("stop", all(self.stop), "stop strings must not be empty"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise UserError(f"{name}: {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One stream of tokens: a prompt and what was generated after it. The scheduler owns
    it: only the scheduler changes it (see :mod:`moegpt.serve.step`)."""

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    prompt: list[int]
    params: SamplingParams
    table: BlockTable
    seed: int | None = None  # its sampling generator's seed (None: greedy)
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache (or being computed)
    in_flight: int = 0  # tokens being drawn by steps not yet taken in
    # decayed counts of proposed tokens tested and accepted: the acceptance-rate estimate
    spec_tested: float = 0.0
    spec_accepted: float = 0.0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    announced: bool = False  # the runner has been told of it
    prompt_logprobs: list[float] = field(default_factory=list)  # of prompt tokens 1.. so far
    images: torch.Tensor | None = None  # (count, H, W) grey uint8, for a vision model

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        """``len(self.tokens)``, without building the list."""
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.prompt) + len(self.output) + self.in_flight - self.computed

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)
