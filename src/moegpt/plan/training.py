"""Training time, GPU-hours and cost for a token budget, and the MFU a duration implies."""

from __future__ import annotations

from dataclasses import dataclass

from moegpt.errors import UserError
from moegpt.plan.hardware import Hardware

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class TrainingEstimate:
    flops: float  # total training FLOPs
    gpus: int
    peak_flops: float  # per GPU, the MFU denominator
    mfu: float
    seconds: float

    @property
    def days(self) -> float:
        return self.seconds / SECONDS_PER_DAY

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.seconds / 3600

    def cost(self, price_per_hour: float) -> float:
        return self.gpu_hours * price_per_hour


def training_time(
    flops: float,
    hw: Hardware,
    gpus: int,
    mfu: float | None = None,
    days: float | None = None,
    precision: str = "bf16",
) -> TrainingEstimate:
    """Days at a given MFU, or (with ``days``) the MFU that duration implies."""
    if gpus < 1:
        raise UserError(f"--gpus: must be positive, got {gpus}")
    peak = hw.peak_flops(precision)
    if days is not None:
        if days <= 0:
            raise UserError(f"--days: must be positive, got {days}")
        seconds = days * SECONDS_PER_DAY
        return TrainingEstimate(flops, gpus, peak, flops / (gpus * peak * seconds), seconds)
    if mfu is None or not 0 < mfu <= 1:
        raise UserError(f"--mfu: must be in (0, 1], got {mfu}")
    return TrainingEstimate(flops, gpus, peak, mfu, flops / (gpus * peak * mfu))


def tokens_per_expert(batch_tokens: float, top_k: int, n_experts: int) -> float:
    """Tokens each expert processes per batch when routing is balanced."""
    return batch_tokens * top_k / n_experts if n_experts else batch_tokens
