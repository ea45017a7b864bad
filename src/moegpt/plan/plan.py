"""Assemble a plan: every figure for one config, cluster and serving layout, as plain data.

The returned dict is the `moegpt plan --json` schema (documented in the README); the table
renderer reads the same dict.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moegpt.config import Config, ModelConfig
from moegpt.errors import UserError
from moegpt.plan.flops import token_flops, training_token_flops
from moegpt.plan.hardware import Hardware, get_hardware
from moegpt.plan.inference import KVFit, ServeLayout, decode, kv_fit
from moegpt.plan.memory import TrainLayout, training_memory
from moegpt.plan.params import param_breakdown
from moegpt.plan.schedule import Schedule, batch_phases, build_schedule
from moegpt.plan.training import (
    TrainingEstimate,
    ring_attention,
    tokens_per_expert,
    training_time,
)
from moegpt.plan.vision import vision_flops, vision_params

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PlanOptions:
    """What `moegpt plan` takes besides the config; None means "from the config"."""

    gpu: str = "h100-sxm"
    gpus: int | None = None
    mfu: float = 0.4
    days: float | None = None
    tokens: float | None = None
    precision: str = "bf16"
    zero: int | None = None
    recompute: bool | None = None
    states: str = "fsdp-fp32-master"
    peak_tflops: float | None = None
    hbm_gb: float | None = None
    hbm_tbps: float | None = None
    price: float | None = None
    infer_gpu: str | None = None
    infer_tp: int | None = None
    infer_pp: int | None = None
    infer_batch: int | None = None
    context: int | None = None
    infer_precision: str = "bf16"
    infer_mfu: float = 1.0
    infer_mbu: float = 1.0
    reserve: float = 0.1
    vision_tokens: float = 2e12  # the seed's vision stage: ~2T tokens after text
    tokens_per_image: float = 256.0


def hardware(name: str, opts: PlanOptions, option: str) -> Hardware:
    """A preset with the command line's hardware overrides (TFLOP/s, GB, TB/s, $) applied."""

    def scaled(value: float | None, unit: float) -> float | None:
        return None if value is None else value * unit

    for flag in ("peak_tflops", "hbm_gb", "hbm_tbps", "price"):
        value = getattr(opts, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag.replace('_', '-')}: must be positive, got {value}")
    peak = "peak_fp8_flops" if opts.precision == "fp8" else "peak_bf16_flops"
    return get_hardware(
        name,
        option,
        **{peak: scaled(opts.peak_tflops, 1e12)},
        hbm_bytes=scaled(opts.hbm_gb, 1e9),
        hbm_bandwidth=scaled(opts.hbm_tbps, 1e12),
        price_per_hour=opts.price,
    )


def train_layout(config: Config, opts: PlanOptions) -> tuple[TrainLayout, int]:
    """The training layout and GPU count: dp = gpus / (tp x pp x cp)."""
    par, train = config.parallel, config.train
    gpus = par.world_size if opts.gpus is None else opts.gpus
    if gpus < 1:
        raise UserError(f"--gpus: must be positive, got {gpus}")
    model_parallel = par.tp * par.pp * par.cp
    if gpus % model_parallel:
        raise UserError(
            f"--gpus: {gpus} is not a multiple of parallel.tp x parallel.pp x parallel.cp = "
            f"{model_parallel}"
        )
    zero = opts.zero
    if zero is None:
        zero = 3 if par.dp_shard * par.cp > 1 else 1 if par.zero1 else 0
    dp = gpus // model_parallel
    # FSDP shards over dp_shard ranks and replicates over the rest (HSDP); ZeRO-1 over all.
    shard_group = par.dp_shard if par.dp_shard > 1 and dp % par.dp_shard == 0 else dp
    if par.cp > 1:  # FSDP shards over the context-parallel ranks too (dp_shard x cp)
        shard_group = (par.dp_shard if dp % par.dp_shard == 0 else dp) * par.cp
    layout = TrainLayout(
        tp=par.tp,
        pp=par.pp,
        dp=dp,
        ep=par.ep,
        cp=par.cp,
        zero_stage=zero,
        micro_batch=train.micro_batch_size,
        seq_len=config.data.seq_len,
        pp_microbatches=par.pp_microbatches,
        pp_schedule=par.pp_schedule,
        recompute=train.activation_checkpointing if opts.recompute is None else opts.recompute,
        states=opts.states,
        shard_group=shard_group,
        keep_gathered=not par.reshard_after_forward,
    )
    return layout, gpus


# How far the planned peak may exceed a GPU before a launch is refused: the plan is within
# about this of measured where model states dominate (small-moe on an H100: 49.9 GB planned,
# 42.5 GB measured), so only a layout past it surely cannot fit; nearer ones get a warning.
MISFIT_MARGIN = 0.15


def training_misfit(
    config: Config, device_bytes: float, device_name: str
) -> tuple[str, bool] | None:
    """Whether the ``[parallel]`` layout fits GPUs of ``device_bytes`` by the planner's figure
    for its most loaded GPU (what ``moegpt plan`` prints): None when it does, else a line
    saying why and True where the plan exceeds the GPU by more than ``MISFIT_MARGIN`` (refuse),
    False where it exceeds it by less (warn). The planner does not model ``train.freeze`` or
    vision models: those are not judged."""
    if config.train.freeze or config.vision.enabled:
        return None
    layout, _ = train_layout(config, PlanOptions())
    memory = training_memory(config.model, layout, device_bytes)
    if memory.fits:
        return None
    gb = 1e9
    parts = (
        f"weights {memory.weights / gb:.1f}, grads {memory.grads / gb:.1f}, optimizer "
        f"{memory.optimizer / gb:.1f}, activations {memory.activations / gb:.1f}, logits "
        f"{memory.logits / gb:.1f}, gathered weights {memory.gathered_weights / gb:.1f}"
    )
    hint = "shard further (parallel.dp_shard, tp, pp or ep)"
    if not config.train.activation_checkpointing:
        hint += " or set train.activation_checkpointing = true"
    line = (
        f"parallel: `moegpt plan` puts this layout's most loaded GPU at "
        f"{memory.total / gb:.1f} GB ({parts}), more than the {device_bytes / gb:.1f} GB of "
        f"{device_name}; {hint}"
    )
    return line, memory.total > device_bytes * (1 + MISFIT_MARGIN)


def serve_layout(config: Config, opts: PlanOptions) -> ServeLayout:
    fp8 = opts.infer_precision == "fp8"
    return ServeLayout(
        tp=config.serve.tp if opts.infer_tp is None else opts.infer_tp,
        pp=config.serve.pp if opts.infer_pp is None else opts.infer_pp,
        precision=opts.infer_precision,
        kv_bytes=1 if fp8 else 2,
        reserve=opts.reserve,
        mfu=opts.infer_mfu,
        mbu=opts.infer_mbu,
    )


def _check_finite(opts: PlanOptions) -> None:
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{f.name.replace('_', '-')}: must be a finite number, got {value}")


def schedule_for_tokens(config: Config, tokens: float) -> Schedule:
    """The config's schedule (batch ramp, warm-up, decay) with as many steps as it takes to
    train at least ``tokens`` tokens."""
    seq, batch = config.data.seq_len, config.train.global_batch_size
    steps = max(math.ceil(tokens / (batch * seq)), 1)
    while True:  # a ramp's small early batches need a few more steps
        schedule = build_schedule(dataclasses.replace(config.train, steps=steps))
        short = tokens - schedule.total_sequences * seq
        if short <= 0:
            return schedule
        steps += math.ceil(short / (batch * seq))


def _serving_misfit(
    m: ModelConfig, hw: Hardware, serve: ServeLayout, context: int, fit: KVFit
) -> str:
    """One line on why the serving layout cannot hold one sequence, and the smallest one
    (TP up to 8, then pipeline stages) that can."""
    gb = 1e9
    why = (
        f"serve layout TP{serve.tp} x PP{serve.pp} on {hw.name}: the weights take "
        f"{fit.weights_per_gpu / gb:.1f} GB a GPU, "
        + (
            f"leaving no room for a {context:,}-token sequence's KV cache"
            if fit.free_per_gpu > 0
            else f"more than the {hw.hbm_bytes * (1 - serve.reserve) / gb:.1f} GB it offers"
        )
    )
    for pp in range(1, m.n_layers + 1):
        for tp in (1, 2, 4, 8):
            if m.n_heads % tp == 0 and tp * pp >= serve.tp * serve.pp:
                layout = dataclasses.replace(serve, tp=tp, pp=pp)
                if kv_fit(m, hw, layout, context).max_batch >= 1:
                    return f"{why}; --infer-tp {tp} --infer-pp {pp} would fit"
    return f"{why}; no layout of up to 8-way TP and {m.n_layers} stages fits"


def _batch_misfit(serve: ServeLayout, context: int, fit: KVFit, batch: int) -> str:
    """One line on why ``--infer-batch`` sequences do not fit, with the largest batch that
    does and the context at which the asked batch would."""
    gb = 1e9
    need = batch * fit.kv_per_sequence_per_gpu
    line = (
        f"--infer-batch: {batch:,} sequences of {context:,} tokens need {need / gb:.1f} GB of "
        f"KV cache a GPU on TP{serve.tp} x PP{serve.pp}, {fit.free_per_gpu / gb:.1f} GB is free; "
        f"at most {fit.max_batch:,} fit"
    )
    shorter = int(fit.free_per_gpu * context // need)  # the context at which all of them fit
    return f"{line}, or {batch:,} at --context {shorter:,}" if shorter >= 1 else line


def build_plan(config: Config, opts: PlanOptions) -> dict[str, Any]:
    _check_finite(opts)
    m = config.model
    seq = config.data.seq_len
    p = param_breakdown(m)
    fwd = token_flops(m, seq)
    train_flops = training_token_flops(m, seq)
    batch_tokens = config.train.global_batch_size * seq
    schedule = build_schedule(config.train)  # with a batch ramp, fewer than steps x batch
    tokens = schedule.total_sequences * seq if opts.tokens is None else opts.tokens
    if tokens <= 0:
        raise UserError(f"--tokens: must be positive, got {tokens}")
    if opts.tokens is not None:  # the schedule that trains them: the config's, lengthened
        schedule = schedule_for_tokens(config, tokens)

    hw = hardware(opts.gpu, opts, "--gpu")
    layout, gpus = train_layout(config, opts)
    total_flops = train_flops.training * tokens
    time = training_time(total_flops, hw, gpus, opts.mfu, opts.days, opts.precision)
    memory = training_memory(m, layout, hw.hbm_bytes)
    ring = None
    if layout.cp > 1:
        ring = ring_attention(
            m,
            hw,
            layout.cp,
            batch_tokens / (layout.dp * layout.cp),
            3 * train_flops.attention,  # forward and its backward (twice the forward)
            time.mfu,
            opts.precision,
        )

    infer_hw = hardware(opts.infer_gpu or opts.gpu, opts, "--infer-gpu")
    serve = serve_layout(config, opts)
    serve.validate(m)
    context = m.max_seq_len if opts.context is None else opts.context
    if context < 1:
        raise UserError(f"--context: must be positive, got {context}")
    if context > m.max_seq_len:
        raise UserError(f"--context: {context} exceeds model.max_seq_len ({m.max_seq_len})")
    fit = kv_fit(m, infer_hw, serve, context)
    if fit.max_batch < 1:  # no roofline or price for a layout that cannot serve one sequence
        raise UserError(_serving_misfit(m, infer_hw, serve, context, fit))
    fit_mha = kv_fit(m, infer_hw, serve, context, n_kv_heads=m.n_heads)
    batch = fit.max_batch if opts.infer_batch is None else opts.infer_batch
    if batch > fit.max_batch:  # a roofline and price for a batch the cache cannot hold mislead
        raise UserError(_batch_misfit(serve, context, fit, batch))
    roofline = decode(m, infer_hw, serve, batch, context)

    return {
        "schema_version": SCHEMA_VERSION,
        "inputs": {
            "model": dataclasses.asdict(m),
            "train_gpu": dataclasses.asdict(hw),
            "infer_gpu": dataclasses.asdict(infer_hw),
            "train_layout": dataclasses.asdict(layout),
            "serve_layout": dataclasses.asdict(serve),
            "tokens": tokens,
            "gpus": gpus,
            "seq_len": seq,
            "context": context,
        },
        "parameters": {
            "total": p.total,
            "active": p.active,
            "embedding": p.embedding,
            "attention": p.attention,
            "experts": p.experts,
            "router": p.router,
            "dense_ffn": p.dense_ffn,
            "norms": p.norms,
            "per_expert": p.expert_per_layer * m.n_moe_layers,
        },
        "flops": {
            "forward_per_token": fwd.forward,
            "forward_matmul_per_token": fwd.matmul,
            "forward_attention_per_token": fwd.attention,
            "training_per_token": train_flops.training,
            "training_total": total_flops,
            "dense_equivalent_forward_per_token": fwd.dense_equivalent_forward,
        },
        "training": {
            "gpus": gpus,
            "mfu": time.mfu,
            "days": time.days,
            "gpu_hours": time.gpu_hours,
            "cost": time.cost(hw.price_per_hour),
            "batch_tokens": batch_tokens,
            "tokens_per_expert_per_batch": tokens_per_expert(batch_tokens, m.top_k, m.n_experts),
            "ring_attention": (
                {**dataclasses.asdict(ring), "exposed_seconds": ring.exposed_seconds}
                if ring
                else None
            ),
        },
        "memory": {**dataclasses.asdict(memory), "total": memory.total, "fits": memory.fits},
        "kv_cache": {
            "bytes_per_token": m.kv_cache_bytes_per_token(serve.kv_bytes),
            "bytes_per_token_mha": m.kv_cache_bytes_per_token(serve.kv_bytes, m.n_heads),
            "per_sequence": fit.kv_per_sequence,
            "per_sequence_mha": fit_mha.kv_per_sequence,
            "weights_per_gpu": fit.weights_per_gpu,
            "free_per_gpu": fit.free_per_gpu,
            "max_batch": fit.max_batch,
            "max_batch_mha": fit_mha.max_batch,
        },
        "inference": dataclasses.asdict(roofline),
        "vision": vision_plan(config, opts, hw, gpus, time.mfu) if config.vision.enabled else None,
        "batch_schedule": [
            {
                **dataclasses.asdict(phase),
                "tokens": phase.sequences * seq,
                "lr_start": schedule.lr(phase.first_step),
                "lr_end": schedule.lr(phase.last_step),
            }
            for phase in batch_phases(schedule)
        ],
        "learning_rate": {"peak": config.train.lr, "warmup_steps": config.train.warmup_steps},
    }


def vision_plan(
    config: Config, opts: PlanOptions, hw: Hardware, gpus: int, mfu: float
) -> dict[str, Any]:
    """What vision adds, and its Flamingo stage: ``opts.vision_tokens`` interleaved tokens, an
    image every ``opts.tokens_per_image``, the language model frozen, on the training
    cluster at the text run's MFU."""
    for name in ("vision_tokens", "tokens_per_image"):
        if getattr(opts, name) <= 0:
            flag = name.replace("_", "-")
            raise UserError(f"--{flag}: must be positive, got {getattr(opts, name)}")
    m, v = config.model, config.vision
    params = vision_params(m, v)
    flops = vision_flops(m, v, config.data.seq_len, opts.tokens_per_image)
    total = flops.stage_per_token * opts.vision_tokens
    # At the text run's MFU, taken as given: with --days it is what those days imply, which
    # the text plan reports even where it exceeds 1.
    peak = hw.peak_flops(opts.precision)
    stage = TrainingEstimate(total, gpus, peak, mfu, total / (gpus * peak * mfu))
    return {
        "parameters": {**dataclasses.asdict(params), "total": params.total},
        "trained_parameters": params.trained_in_flamingo_stage,
        "flops": dataclasses.asdict(flops),
        "stage": {
            "tokens": opts.vision_tokens,
            "tokens_per_image": opts.tokens_per_image,
            "images": opts.vision_tokens / opts.tokens_per_image,
            "flops": total,
            "days": stage.days,
            "gpu_hours": stage.gpu_hours,
            "cost": stage.cost(hw.price_per_hour),
        },
    }
