"""Serving on paper: KV-cache sizes, the largest batch that fits, and a decode roofline.

A decode round advances every sequence in flight by one token. With pipeline parallelism the
batch is split into micro-batches that follow each other through the stages, so each GPU reads
its weights once per micro-batch: pipeline stages add memory, not bandwidth. A round therefore
takes max(m, pp) micro-batch slots, each bounded by the slower of compute (FLOPs / peak) and
memory (weights + KV bytes / bandwidth) on one GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moegpt.config import ModelConfig
from moegpt.errors import UserError
from moegpt.plan.flops import token_flops
from moegpt.plan.hardware import Hardware
from moegpt.plan.memory import StageParams, TrainLayout, kv_heads_per_rank, stage_params


@dataclass(frozen=True)
class ServeLayout:
    tp: int = 8
    pp: int = 16
    microbatches: int = 0  # 0 = one per stage, the fewest that keep every stage busy
    precision: str = "bf16"  # weights and compute: bf16 or fp8
    kv_bytes: int = 2  # bytes per cached K/V element
    reserve: float = 0.1  # share of HBM kept for activations, workspace, fragmentation
    mfu: float = 1.0  # achieved share of peak FLOP/s (1.0 = ideal roofline)
    mbu: float = 1.0  # achieved share of peak bandwidth

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def weight_bytes(self) -> int:
        return 1 if self.precision == "fp8" else 2

    @property
    def rounds_slots(self) -> int:
        return max(self.microbatches or self.pp, self.pp)

    def validate(self, c: ModelConfig) -> None:
        if self.tp < 1 or self.pp < 1:
            raise UserError(f"--infer-tp/--infer-pp: must be positive, got {self.tp}, {self.pp}")
        if c.n_heads % self.tp:
            raise UserError(f"--infer-tp: {self.tp} does not divide model.n_heads ({c.n_heads})")
        if self.pp > c.n_layers:
            raise UserError(f"--infer-pp: {self.pp} stages exceed model.n_layers ({c.n_layers})")
        if self.precision not in ("bf16", "fp8"):
            raise UserError(f"--precision: expected bf16 or fp8, got {self.precision!r}")
        for name in ("mfu", "mbu"):
            if not 0 < getattr(self, name) <= 1:
                raise UserError(f"--infer-{name}: must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.reserve < 1:
            raise UserError(f"--reserve: must be in [0, 1), got {self.reserve}")


@dataclass(frozen=True)
class KVFit:
    """What fits on the most loaded GPU of a serving layout at one context length."""

    context: int
    weights_per_gpu: float  # bytes
    free_per_gpu: float  # bytes left for the KV cache after weights and the reserve
    kv_per_sequence: float  # bytes, whole model
    kv_per_sequence_per_gpu: float  # bytes on the most loaded GPU
    max_batch: int  # sequences in flight over the whole cluster


def _worst_stage(c: ModelConfig, layout: ServeLayout) -> StageParams:
    """Parameters and layers of the most loaded GPU's stage."""
    stages = stage_params(c, TrainLayout(tp=layout.tp, pp=layout.pp))
    return max(stages, key=lambda s: (s.shared + s.experts, s.layers))


def _kv_bytes_per_token_on_gpu(c: ModelConfig, layout: ServeLayout, layers: int) -> float:
    return 2 * layers * kv_heads_per_rank(c, layout.tp) * c.head_dim * layout.kv_bytes


def kv_fit(
    c: ModelConfig, hw: Hardware, layout: ServeLayout, context: int, n_kv_heads: int | None = None
) -> KVFit:
    """Largest batch at ``context`` tokens; ``n_kv_heads`` models e.g. the MHA equivalent."""
    if n_kv_heads is not None:
        c = dataclasses.replace(c, n_kv_heads=n_kv_heads)
    stage = _worst_stage(c, layout)
    weights = (stage.shared + stage.experts) * layout.weight_bytes
    free = hw.hbm_bytes * (1 - layout.reserve) - weights
    per_seq_gpu = _kv_bytes_per_token_on_gpu(c, layout, stage.layers) * context
    per_seq = c.kv_cache_bytes_per_token(layout.kv_bytes) * context
    return KVFit(
        context=context,
        weights_per_gpu=weights,
        free_per_gpu=free,
        kv_per_sequence=per_seq,
        kv_per_sequence_per_gpu=per_seq_gpu,
        max_batch=max(0, int(free // per_seq_gpu)),
    )


@dataclass(frozen=True)
class DecodeEstimate:
    batch: int
    context: int
    round_time: float  # seconds for every sequence to gain one token (time per output token)
    tokens_per_second: float  # whole cluster
    bound: str  # "memory" or "compute"
    cost_per_1k_tokens: float  # dollars
    arithmetic_intensity: float  # FLOPs per byte read on one GPU


def experts_touched_fraction(c: ModelConfig, tokens: float) -> float:
    """Expected share of a layer's experts hit when ``tokens`` each pick top_k of n_experts."""
    if not c.n_experts:
        return 1.0
    return 1 - (1 - c.top_k / c.n_experts) ** tokens


def decode(
    c: ModelConfig, hw: Hardware, layout: ServeLayout, batch: int, context: int
) -> DecodeEstimate:
    """Roofline estimate of one decode round at ``batch`` sequences of ``context`` tokens."""
    if batch < 1:
        raise UserError(f"--infer-batch: must be positive, got {batch}")
    slots = layout.rounds_slots
    micro = batch / (layout.microbatches or layout.pp)
    flops = token_flops(c, context)
    stage = _worst_stage(c, layout)
    touched = stage.shared + stage.experts * experts_touched_fraction(c, micro)
    kv_token_gpu = _kv_bytes_per_token_on_gpu(c, layout, stage.layers)
    bytes_gpu = touched * layout.weight_bytes + micro * context * kv_token_gpu
    flops_gpu = micro * flops.forward / layout.gpus
    compute_time = flops_gpu / (hw.peak_flops(layout.precision, "--infer-precision") * layout.mfu)
    memory_time = bytes_gpu / (hw.hbm_bandwidth * layout.mbu)
    round_time = slots * max(compute_time, memory_time)
    tokens_per_second = batch / round_time
    dollars_per_second = layout.gpus * hw.price_per_hour / 3600
    return DecodeEstimate(
        batch=batch,
        context=context,
        round_time=round_time,
        tokens_per_second=tokens_per_second,
        bound="compute" if compute_time >= memory_time else "memory",
        cost_per_1k_tokens=dollars_per_second / tokens_per_second * 1000,
        arithmetic_intensity=flops_gpu / bytes_gpu,
    )


def batch_for_cost(
    c: ModelConfig,
    hw: Hardware,
    layout: ServeLayout,
    context: int,
    target: float,
    limit: int = 1 << 20,
) -> int | None:
    """Smallest batch whose decode cost per 1k tokens is at most ``target`` (None: never)."""
    if decode(c, hw, layout, limit, context).cost_per_1k_tokens > target:
        return None
    low, high = 1, limit
    while low < high:
        mid = (low + high) // 2
        if decode(c, hw, layout, mid, context).cost_per_1k_tokens <= target:
            high = mid
        else:
            low = mid + 1
    return low
