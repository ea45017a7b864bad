"""Training time, GPU-hours and cost for a token budget, and the MFU a duration implies."""

from __future__ import annotations

from dataclasses import dataclass

from moegpt.config import ModelConfig
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


@dataclass(frozen=True)
class RingAttention:
    """What context parallelism adds to one optimizer step on each GPU: ring attention's
    K/V traffic, against the attention compute it can hide behind."""

    cp: int
    bytes_per_step: float  # sent by each GPU
    comm_seconds: float  # at the GPU's NVLink bandwidth
    attention_seconds: float  # its attention FLOPs at the planned MFU

    @property
    def exposed_seconds(self) -> float:
        """Traffic the attention compute does not cover (each ring round overlaps one chunk's
        attention)."""
        return max(0.0, self.comm_seconds - self.attention_seconds)


def ring_attention(
    c: ModelConfig,
    hw: Hardware,
    cp: int,
    tokens_per_gpu: float,
    attention_flops_per_token: float,
    mfu: float,
    precision: str = "bf16",
) -> RingAttention:
    """Per step and GPU, for ``tokens_per_gpu`` tokens (its 1/cp of each sequence).

    Forward passes each GPU's bf16 K/V chunk around the ring (cp - 1 hops); backward passes
    it again with its fp32 gradients (PyTorch accumulates them in fp32): 1 + 1 + 2 = 4 times
    the bf16 K/V bytes per hop, in every layer. MQA's single K/V head keeps this small.
    """
    kv_bytes = tokens_per_gpu * 2 * c.n_kv_heads * c.head_dim * 2 * c.n_layers
    sent = 4 * kv_bytes * (cp - 1)
    compute = tokens_per_gpu * attention_flops_per_token / (hw.peak_flops(precision) * mfu)
    return RingAttention(cp, sent, sent / hw.nvlink_bandwidth, compute)
