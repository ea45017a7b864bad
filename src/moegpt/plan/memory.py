"""Training memory per GPU for a parallel layout, and the pipeline bubble.

Model states follow the ZeRO paper (Rajbhandari et al. 2019): with mixed precision a parameter
costs 2 bytes (bf16 weight) + 2 (bf16 gradient) + 12 (fp32 master copy, Adam m and v) = 16;
stage 1 shards the 12, stage 2 also the gradients, stage 3 (= FSDP) also the weights, over the
data-parallel ranks. moegpt's own training (FSDP2, torchtitan-style) keeps fp32 weights and
gradients and bf16 compute copies: 4 + 4 + 8 bytes.

Activations are what moegpt's modules save for backward, per token and layer, in bytes
(bf16 = 2, fp32 = 4), with tensor parallelism assumed to use sequence parallelism so that all
of a layer's activations split over the TP ranks (Korthikanti et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

from moegpt.config import ModelConfig
from moegpt.errors import UserError
from moegpt.plan.params import ffn_params, param_breakdown


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of the model states."""

    weights: int
    grads: int
    optimizer: int


STATE_PRECISIONS = {
    "fsdp-fp32-master": StateBytes(weights=4, grads=4, optimizer=8),  # moegpt / torchtitan
    "mixed": StateBytes(weights=2, grads=2, optimizer=12),  # Megatron / ZeRO paper
}


@dataclass(frozen=True)
class TrainLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    cp: int = 1  # context parallelism: each rank holds seq_len / cp of every sequence
    zero_stage: int = 0  # 0 none, 1 optimizer, 2 + gradients, 3 + weights (FSDP)
    micro_batch: int = 1  # sequences per micro-batch
    seq_len: int = 2048
    pp_microbatches: int = 1
    pp_schedule: str = "1f1b"
    recompute: bool = False
    states: str = "fsdp-fp32-master"
    shard_group: int = 0  # ranks ZeRO shards over (HSDP: dp_shard of dp, x cp); 0 = all of dp
    keep_gathered: bool = False  # ZeRO-3 with each layer's gathered weights kept for backward

    def validate(self, c: ModelConfig) -> None:
        for name in ("tp", "pp", "dp", "ep", "cp", "micro_batch", "seq_len", "pp_microbatches"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}"
                )
        if self.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"--zero: stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if c.n_heads % self.tp:
            raise UserError(f"parallel.tp: {self.tp} does not divide model.n_heads ({c.n_heads})")
        if self.pp > c.n_layers:
            raise UserError(f"parallel.pp: {self.pp} stages exceed model.n_layers ({c.n_layers})")
        if self.ep > 1 and (not c.n_experts or c.n_experts % self.ep or self.dp % self.ep):
            raise UserError(
                f"parallel.ep: {self.ep} must divide model.n_experts ({c.n_experts}) and the "
                f"data-parallel degree ({self.dp}) it is drawn from"
            )
        if self.seq_len % self.cp:
            raise UserError(f"parallel.cp: {self.cp} does not divide data.seq_len ({self.seq_len})")
        if self.states not in STATE_PRECISIONS:
            raise UserError(
                f"--states: unknown {self.states!r} (known: {', '.join(STATE_PRECISIONS)})"
            )

    @property
    def shard_ranks(self) -> int:
        return self.shard_group or self.dp


INTERLEAVED_CHUNKS = 2  # model chunks per rank in the interleaved 1F1B schedule


def bubble_fraction(stages: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of a pipeline step: (p - 1) / (v*m + p - 1) (GPipe/1F1B have v = 1)."""
    return (stages - 1) / (virtual_stages * microbatches + stages - 1)


def kv_heads_per_rank(c: ModelConfig, tp: int) -> int:
    """K/V heads each TP rank holds: an even split when there are at least tp of them, else
    the one head its query heads share (replicated over tp / n_kv_heads ranks; MQA on TP8)."""
    return c.n_kv_heads // tp if c.n_kv_heads >= tp else 1


def attention_params_per_rank(c: ModelConfig, tp: int) -> float:
    q_and_o = 2 * c.d_model * c.n_heads * c.head_dim / tp
    return q_and_o + 2 * c.d_model * kv_heads_per_rank(c, tp) * c.head_dim


@dataclass(frozen=True)
class StageParams:
    """Parameters one GPU of a pipeline stage holds before any ZeRO sharding."""

    shared: float  # replicated over data-parallel ranks
    experts: float  # replicated over dp / ep ranks
    layers: int


def stage_params(c: ModelConfig, layout: TrainLayout) -> list[StageParams]:
    """Per-GPU parameters of each pipeline stage (layers split as evenly as possible)."""
    tp, pp = layout.tp, layout.pp
    p = param_breakdown(c)
    base, extra = divmod(c.n_layers, pp)
    stages, first_layer = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        layers = range(first_layer, first_layer + n)
        first_layer += n
        shared = n * (attention_params_per_rank(c, tp) + 2 * c.d_model)
        moe = sum(c.is_moe_layer(i) for i in layers)
        shared += moe * c.d_model * c.n_experts + (n - moe) * ffn_params(c, c.ffn_hidden) / tp
        experts = moe * c.n_experts * p.expert_per_layer / (tp * layout.ep)
        # vocabulary-parallel embedding and head; a tied pair stays replicated under TP
        table = c.vocab_size * c.d_model / (1 if c.tie_embeddings else tp)
        if s == 0:
            shared += table
        if s == pp - 1:
            shared += c.d_model + (table if not c.tie_embeddings or pp > 1 else 0)
        stages.append(StageParams(shared=shared, experts=experts, layers=n))
    return stages


def activation_bytes_per_token_layer(c: ModelConfig, moe: bool) -> float:
    """Bytes one token leaves saved for backward in one layer (bf16 compute, no recompute).

    Attention: the norm's fp32 input and bf16 output (6d); RoPE's fp32 copies of q and k (8 per
    element) and their bf16 results, v, the SDPA output and its copy for wo (14 per query-head
    channel, 12 per KV channel), the fp32 log-sum-exp (4 per head). Feed-forward: the norm (6d),
    and per routed slot the gathered input (2d), four F-sized bf16 tensors of SwiGLU
    (8F; GELU keeps two: 4F) and the fp32 output weighted in the combine (4d); MoE adds the
    router's fp32 input (4d).
    """
    d, f = c.d_model, c.expert_hidden_size if moe else c.ffn_hidden
    q_channels, kv_channels = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    attention = 6 * d + 14 * q_channels + 12 * kv_channels + 4 * c.n_heads
    hidden = (8 if c.activation == "swiglu" else 4) * f
    if moe:
        return attention + 6 * d + 4 * d + c.top_k * (2 * d + hidden + 4 * d)
    return attention + 6 * d + hidden


# The chunked loss (moegpt.train.loss) keeps the bf16 logits and writes their bf16 gradient;
# alive together at the start of backward, beside one chunk's fp32 temporaries (its upcast
# logits, softmax and one-hot, eager) of LOSS_CHUNK_VALUES each, whatever the vocabulary.
LOGIT_BYTES = 2 + 2
LOSS_CHUNK_VALUES = 1 << 26  # moegpt.train.loss.CHUNK_VALUES (a test keeps them equal)


def logit_bytes(values: float) -> float:
    """Peak bytes of the loss over ``values`` logits (the last pipeline stage's)."""
    return LOGIT_BYTES * values + 3 * 4 * min(values, LOSS_CHUNK_VALUES)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float
    logits: float
    gathered_weights: float  # ZeRO-3/FSDP: bf16 copies of the layers being computed
    hbm_bytes: float
    bubble: float

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.grads
            + self.optimizer
            + self.activations
            + self.logits
            + self.gathered_weights
        )

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm_bytes


def in_flight_microbatches(layout: TrainLayout, stage: int) -> float:
    """Micro-batches whose activations a stage holds at its peak: GPipe all m; 1F1B stage s
    holds min(p - s, m); interleaved 1F1B (v chunks) (1 + (p-1)/(p v)) times that on the
    first stage (Korthikanti et al. 2022)."""
    p, m = layout.pp, layout.pp_microbatches
    if p == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return m
    held = min(p - stage, m)
    if layout.pp_schedule == "interleaved_1f1b":
        held *= 1 + (p - 1) / (p * INTERLEAVED_CHUNKS)
    return held


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes of weights, gradients and optimizer states one GPU of a stage holds."""

    weights: float
    grads: float
    optimizer: float


def model_state_bytes(c: ModelConfig, layout: TrainLayout) -> list[ModelStateBytes]:
    """Per pipeline stage, what each of its GPUs holds of the model states: ZeRO stage z
    shards the optimizer (z >= 1), gradients (z >= 2) and weights (z = 3) over the shard
    group, experts over the part of it outside their expert-parallel group."""
    state = STATE_PRECISIONS[layout.states]
    shard = layout.shard_ranks
    expert_shard = max(shard // layout.ep, 1)

    def sharded(params: StageParams, bytes_per: int, from_stage: int) -> float:
        if layout.zero_stage < from_stage:
            return bytes_per * (params.shared + params.experts)
        return bytes_per * (params.shared / shard + params.experts / expert_shard)

    return [
        ModelStateBytes(
            weights=sharded(params, state.weights, 3),
            grads=sharded(params, state.grads, 2),
            optimizer=sharded(params, state.optimizer, 1),
        )
        for params in stage_params(c, layout)
    ]


def training_memory(c: ModelConfig, layout: TrainLayout, hbm_bytes: float) -> MemoryEstimate:
    """Peak memory of the most loaded GPU (whichever pipeline stage that is)."""
    layout.validate(c)
    z = layout.zero_stage

    # Tokens of a micro-batch one GPU holds: context parallelism splits each sequence (ring
    # attention's in-flight K/V chunk, 2 x kv channels a token, is too small to count).
    micro_tokens = layout.micro_batch * layout.seq_len / layout.cp
    bubble = bubble_fraction(
        layout.pp,
        layout.pp_microbatches,
        INTERLEAVED_CHUNKS if layout.pp_schedule == "interleaved_1f1b" else 1,
    )
    estimates = []
    first = 0
    states = model_state_bytes(c, layout)
    for s, params in enumerate(stage_params(c, layout)):
        per_layer = [
            activation_bytes_per_token_layer(c, c.is_moe_layer(i))
            for i in range(first, first + params.layers)
        ]
        first += params.layers
        in_flight = in_flight_microbatches(layout, s)
        if layout.recompute:  # every in-flight micro-batch keeps only its blocks' bf16
            # inputs; one block at a time is recomputed for one micro-batch
            per_token = 2 * c.d_model * params.layers * in_flight + max(per_layer, default=0)
        else:
            per_token = sum(per_layer) * in_flight
        last = s == layout.pp - 1
        gathered = 0.0
        if z == 3 and params.layers:
            # Two layers' unsharded bf16 weights in flight (the current one and the prefetch),
            # or every layer's when each keeps its own from its forward to its backward.
            layers_held = params.layers if layout.keep_gathered else 2
            gathered = layers_held * 2 * (params.shared + params.experts) / params.layers
        estimates.append(
            MemoryEstimate(
                weights=states[s].weights,
                grads=states[s].grads,
                optimizer=states[s].optimizer,
                activations=per_token * micro_tokens / layout.tp,
                logits=logit_bytes(micro_tokens * c.vocab_size / layout.tp) if last else 0.0,
                gathered_weights=gathered,
                hbm_bytes=hbm_bytes,
                bubble=bubble,
            )
        )
    return max(estimates, key=lambda e: e.total)
