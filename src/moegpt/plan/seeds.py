"""`moegpt plan --against-seeds`: the leaked GPT-4 figures beside what the arithmetic gives.

Every computed figure comes from the config and the hardware presets through the same
functions as the rest of the planner; the seed's numbers are only ever printed beside them.
Where the two disagree the note says why, rather than a formula being bent to agree (the
seed is a leak, not ground truth).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from moegpt.config import Config, ModelConfig
from moegpt.console import human
from moegpt.errors import UserError
from moegpt.plan.flops import token_flops, training_token_flops
from moegpt.plan.hardware import PRESETS
from moegpt.plan.inference import ServeLayout, batch_for_cost, decode, kv_fit
from moegpt.plan.memory import TrainLayout, stage_params, training_memory
from moegpt.plan.params import param_breakdown
from moegpt.plan.training import tokens_per_expert, training_time

# The seed's figures: the leaked descriptions of GPT-4, as published.
SEED = {
    "total_params": 1.8e12,
    "active_params": 280e9,
    "forward_flops": 560e9,
    "training_flops": 2.15e25,
    "tokens": 13e12,
    "a100_count": 25_000,
    "a100_days": (90, 100),
    "a100_mfu": (0.32, 0.36),
    "a100_cost": 63e6,
    "h100_count": 8_192,
    "h100_days": 55,
    "h100_cost": 21.5e6,
    "batch_tokens": 60e6,
    "tokens_per_expert": 7.5e6,
    "node_params": 130e9,
    "cost_per_1k_a100": 0.0049,
    "cost_per_1k_h100": 0.0021,
}
# The model the seeds describe (configs/gpt4-1.8t.toml): its figures are only comparable with
# a config of this shape. Another model's plan has no seed to be held against.
SEED_SHAPE = {
    "n_layers": 120,
    "d_model": 15360,
    "n_heads": 120,
    "n_kv_heads": 1,
    "n_experts": 16,
    "top_k": 2,
}
TRAIN_TP, TRAIN_PP, TRAIN_MICROBATCHES = 8, 15, 64
SERVE = ServeLayout(tp=8, pp=16)
# Every sequence at the full 8k window, and at 2k: a typical prompt plus answer, which is
# closer to the average context a serving cluster holds.
COST_CONTEXTS = (8192, 2048)


def _row(figure: str, seed: float, computed: float, unit: str, note: str) -> dict[str, Any]:
    return {
        "figure": figure,
        "seed": seed,
        "computed": computed,
        "ratio": computed / seed,
        "unit": unit,
        "note": note,
    }


def seed_comparison(config: Config) -> dict[str, Any]:
    m = config.model
    differs = [f"model.{k} {getattr(m, k)}" for k, v in SEED_SHAPE.items() if getattr(m, k) != v]
    if differs:
        shape = ", ".join(f"{k} {v}" for k, v in SEED_SHAPE.items())
        raise UserError(
            f"--against-seeds: the seeds' figures describe one model ({shape}: "
            f"configs/gpt4-1.8t.toml); this config is another ({', '.join(differs)}), so "
            "`moegpt plan` without the flag is its plan"
        )
    p = param_breakdown(m)
    fwd = token_flops(m, 0)
    seq = config.data.seq_len
    six_nd = fwd.training * SEED["tokens"]  # 3 x forward matmul FLOPs: the 6·N·D convention
    with_attention = training_token_flops(m, seq).training * SEED["tokens"]
    a100, a100_80, h100 = PRESETS["a100-40g"], PRESETS["a100-80g"], PRESETS["h100-sxm"]
    low_mfu, high_mfu = SEED["a100_mfu"]
    slow = training_time(six_nd, a100, SEED["a100_count"], mfu=low_mfu)
    fast = training_time(six_nd, a100, SEED["a100_count"], mfu=high_mfu)
    h100_run = training_time(six_nd, h100, SEED["h100_count"], days=SEED["h100_days"])
    h100_fp8 = training_time(
        six_nd, h100, SEED["h100_count"], days=SEED["h100_days"], precision="fp8"
    )
    seed_gpu_hours = SEED["a100_cost"] / a100.price_per_hour
    seed_days_at_cost = seed_gpu_hours / SEED["a100_count"] / 24
    mfu_at_cost_seed = SEED["training_flops"] / (seed_gpu_hours * 3600 * a100.peak_bf16_flops)
    mfu_at_cost_ours = six_nd / (seed_gpu_hours * 3600 * a100.peak_bf16_flops)
    busiest = max(
        stage_params(m, TrainLayout(tp=SERVE.tp, pp=SERVE.pp)),
        key=lambda st: st.shared + st.experts,
    )
    node_params = (busiest.shared + busiest.experts) * SERVE.tp

    rows = [
        _row(
            "total parameters",
            SEED["total_params"],
            p.total,
            "params",
            "another source says 1.76T; the seeds' shape gives "
            f"{p.experts / m.n_experts / 1e9:.0f}B per expert, {p.attention / 1e9:.0f}B attention",
        ),
        _row(
            "active parameters per token",
            SEED["active_params"],
            p.active,
            "params",
            f"{m.top_k} of {m.n_experts} experts plus everything shared (embeddings included)",
        ),
        _row(
            "forward FLOP per token",
            SEED["forward_flops"],
            fwd.matmul,
            "FLOP",
            "the seed writes '560 TFLOPs': its own numbers give 2 x 280B = 5.6e11 FLOP; "
            f"attention at {seq} context adds {token_flops(m, seq).attention:.2e} on top",
        ),
        _row(
            f"training FLOPs, {human(SEED['tokens'])} tokens",
            SEED["training_flops"],
            six_nd,
            "FLOP",
            f"6·N·D with N = active multiplying parameters; counting causal attention at {seq} "
            f"gives {with_attention:.3e}",
        ),
        _row(
            f"days on {SEED['a100_count']:,} A100 at {low_mfu:.0%} MFU",
            SEED["a100_days"][1],
            slow.days,
            "days",
            "the seed's range is 90-100 days for 32-36% MFU",
        ),
        _row(
            f"days on {SEED['a100_count']:,} A100 at {high_mfu:.0%} MFU",
            SEED["a100_days"][0],
            fast.days,
            "days",
            "the fast end of the same range",
        ),
        _row(
            f"cost at ${a100.price_per_hour:g}/A100-hour ({low_mfu:.0%} MFU)",
            SEED["a100_cost"],
            slow.cost(a100.price_per_hour),
            "$",
            f"$63M buys {human(seed_gpu_hours)} A100-hours ({seed_days_at_cost:.0f} days of "
            f"{SEED['a100_count']:,} GPUs): {mfu_at_cost_seed:.1%} MFU on the seed's own "
            f"{SEED['training_flops']:.3g} FLOPs, {mfu_at_cost_ours:.1%} on ours, at or just "
            "under the low end of its 32-36% range",
        ),
        _row(
            f"cost of {SEED['h100_count']:,} H100 x {SEED['h100_days']} days at "
            f"${h100.price_per_hour:g}/hour",
            SEED["h100_cost"],
            h100_run.cost(h100.price_per_hour),
            "$",
            f"these inputs imply {h100_run.mfu:.0%} MFU of the bf16 peak "
            f"({h100_fp8.mfu:.0%} of fp8): the seed's 55 days needs fp8 or a far better MFU "
            "than its A100 run",
        ),
        _row(
            "tokens per expert per batch",
            SEED["tokens_per_expert"],
            tokens_per_expert(SEED["batch_tokens"], m.top_k, m.n_experts),
            "tokens",
            f"{human(SEED['batch_tokens'])}-token batch x {m.top_k} / {m.n_experts} experts",
        ),
        _row(
            "parameters per 8-GPU inference node",
            SEED["node_params"],
            node_params,
            "params",
            f"the busiest of {SERVE.pp} pipeline stages ({busiest.layers} of {m.n_layers} "
            f"layers and an embedding table) on {SERVE.tp} GPUs; the average is "
            f"{human(p.total / SERVE.pp)}",
        ),
    ]

    train_memory = []
    for hw_name in ("a100-40g", "a100-80g"):
        hw = PRESETS[hw_name]
        for ep, recompute in ((1, False), (1, True), (m.n_experts or 1, True)):
            layout = TrainLayout(
                tp=TRAIN_TP,
                pp=TRAIN_PP,
                dp=SEED["a100_count"] // (TRAIN_TP * TRAIN_PP),
                ep=ep,
                zero_stage=1,
                micro_batch=1,
                seq_len=seq,
                pp_microbatches=TRAIN_MICROBATCHES,
                recompute=recompute,
                states="mixed",
            )
            est = training_memory(m, layout, hw.hbm_bytes)
            train_memory.append(
                {
                    "gpu": hw_name,
                    "ep": ep,
                    "recompute": recompute,
                    "total": est.total,
                    "weights": est.weights,
                    "grads": est.grads,
                    "optimizer": est.optimizer,
                    "activations": est.activations,
                    "fits": est.fits,
                }
            )

    kv_rows = []
    for hw_name in ("a100-40g", "a100-80g", "h100-sxm"):
        hw = PRESETS[hw_name]
        for context in (8192, 32768):
            mqa = kv_fit(m, hw, SERVE, context)
            mha = kv_fit(m, hw, SERVE, context, n_kv_heads=m.n_heads)
            kv_rows.append(
                {
                    "gpu": hw_name,
                    "context": context,
                    "per_sequence_mqa": mqa.kv_per_sequence,
                    "per_sequence_mha": mha.kv_per_sequence,
                    "weights_per_gpu": mqa.weights_per_gpu,
                    "free_per_gpu": mqa.free_per_gpu,
                    "max_batch_mqa": mqa.max_batch,
                    "max_batch_mha": mha.max_batch,
                }
            )

    cost_rows = []
    for hw, precision, target in (
        (a100, "bf16", SEED["cost_per_1k_a100"]),
        (a100_80, "bf16", SEED["cost_per_1k_a100"]),
        (h100, "bf16", SEED["cost_per_1k_h100"]),
        (h100, "fp8", SEED["cost_per_1k_h100"]),
    ):
        layout = dataclasses.replace(
            SERVE, precision=precision, kv_bytes=1 if precision == "fp8" else 2
        )
        for context in COST_CONTEXTS:
            fit = kv_fit(m, hw, layout, context)
            at_max = decode(m, hw, layout, max(fit.max_batch, 1), context)
            needed = batch_for_cost(m, hw, layout, context, target)
            # The roofline time is max(compute, memory) / utilisation, so cost scales as
            # 1 / utilisation: the share of peak the seed's figure needs at the largest batch.
            utilisation = at_max.cost_per_1k_tokens / target if fit.max_batch else math.inf
            cost_rows.append(
                {
                    "gpu": hw.name,
                    "precision": precision,
                    "context": context,
                    "seed_cost_per_1k": target,
                    "max_batch": fit.max_batch,
                    "cost_at_max_batch": at_max.cost_per_1k_tokens,
                    "tokens_per_second_at_max_batch": at_max.tokens_per_second,
                    "bound": at_max.bound,
                    "batch_for_seed_cost": needed,
                    "reachable": needed is not None and needed <= fit.max_batch,
                    "utilisation_needed": utilisation if utilisation <= 1 else None,
                }
            )

    fewer_stages = ServeLayout(tp=SERVE.tp, pp=SERVE.pp // 2, reserve=SERVE.reserve)
    context_32k = {
        "pp": fewer_stages.pp,
        "max_batch": kv_fit(m, a100, fewer_stages, 32768).max_batch,
        "weights_per_gpu": kv_fit(m, a100, fewer_stages, 32768).weights_per_gpu,
    }

    return {
        "figures": rows,
        "training_memory": train_memory,
        "kv_cache": kv_rows,
        "inference_cost": cost_rows,
        "claims": _claims(kv_rows, train_memory, cost_rows, context_32k, m, p.total),
        "assumptions": {
            "serve_reserve": SERVE.reserve,
            "roofline_utilisation": "ideal: 100% of peak FLOP/s and bandwidth",
            "train_layout": f"TP{TRAIN_TP} x PP{TRAIN_PP}, ZeRO-1, micro-batch 1, "
            "64 micro-batches, bf16 weights/grads + fp32 master and Adam (16 bytes/parameter)",
        },
    }


def _claims(
    kv_rows: list[dict],
    train_memory: list[dict],
    cost_rows: list[dict],
    context_32k: dict,
    m: ModelConfig,
    total_params: int,
) -> list[dict[str, str]]:
    """The seed's qualitative claims, each with the verdict the numbers above give."""
    a100_32k = next(r for r in kv_rows if r["gpu"] == "a100-40g" and r["context"] == 32768)
    a100_8k = next(r for r in kv_rows if r["gpu"] == "a100-40g" and r["context"] == 8192)
    a100_8k_cost = next(r for r in cost_rows if r["gpu"] == "a100-40g" and r["context"] == 8192)
    fitting = [r for r in train_memory if r["fits"]]
    seed_ratio = SEED["cost_per_1k_a100"] / SEED["cost_per_1k_h100"]
    h100 = PRESETS["h100-sxm"]
    # Memory-bound at equal batch, cost per token scales with price x bytes / bandwidth: the
    # H100's advantage over each A100 in bf16, and in fp8 (half the bytes).
    ratios = {}
    for name in ("a100-40g", "a100-80g"):
        a100 = PRESETS[name]
        speed = h100.hbm_bandwidth / a100.hbm_bandwidth
        price = h100.price_per_hour / a100.price_per_hour
        ratios[f"H100 bf16 vs {name}"] = speed / price
        ratios[f"H100 fp8 vs {name}"] = 2 * speed / price
    closest = min(ratios, key=lambda k: abs(math.log(ratios[k] / seed_ratio)))
    in_flight = min(TRAIN_PP, TRAIN_MICROBATCHES)
    reachable = [
        f"{r['gpu']} {r['precision']} at {r['context']} context (batch {r['batch_for_seed_cost']})"
        for r in cost_rows
        if r["reachable"]
    ]
    at_max = "; ".join(
        f"{r['gpu']} {r['precision']} {r['context']}: ${r['cost_at_max_batch']:.4f} at "
        f"batch {r['max_batch']}"
        for r in cost_rows
    )
    return [
        {
            "claim": "32k context does not fit on 40GB A100s",
            "verdict": "holds only without MQA" if a100_32k["max_batch_mqa"] else "holds",
            "evidence": (
                f"TP8 x PP16 leaves {a100_32k['free_per_gpu'] / 1e9:.1f} GB per GPU after bf16 "
                f"weights and a {SERVE.reserve:.0%} reserve: {a100_32k['max_batch_mqa']} "
                f"sequences of 32k fit with MQA, {a100_32k['max_batch_mha']} with {m.n_heads}-head "
                f"MHA. With PP{context_32k['pp']} the weights alone take "
                f"{context_32k['weights_per_gpu'] / 1e9:.0f} GB per GPU "
                f"({context_32k['max_batch']} sequences fit)."
            ),
        },
        {
            "claim": "8k context caps the batch size",
            "verdict": "holds" if not a100_8k_cost["reachable"] else "does not hold",
            "evidence": (
                f"on A100-40GB at 8k at most {a100_8k['max_batch_mqa']} sequences fit per "
                "128-GPU cluster; decode is memory-bound (each micro-batch re-reads its stage's "
                f"weights) and reaching the seed's ${a100_8k_cost['seed_cost_per_1k']} per 1k "
                f"tokens needs {a100_8k_cost['batch_for_seed_cost'] or 'an unbounded number of'} "
                "sequences in flight"
            ),
        },
        {
            "claim": "training on A100s with TP8 x PP15 and ZeRO-1",
            "verdict": "fits only as "
            + (
                ", ".join(
                    f"{r['gpu']} with EP{r['ep']}, recompute {'on' if r['recompute'] else 'off'}"
                    for r in fitting
                )
                or "none of the variants tried"
            ),
            "evidence": (
                f"without expert parallelism each GPU holds 1/{TRAIN_TP * TRAIN_PP} of all "
                f"{human(total_params)} parameters as bf16 weights and gradients; EP over the "
                "data-parallel ranks divides the experts, and recomputation the activations of "
                f"the {in_flight} micro-batches the first stage holds under 1F1B"
            ),
        },
        {
            "claim": f"~${SEED['cost_per_1k_a100']} (A100) and ~${SEED['cost_per_1k_h100']} "
            f"(H100) per 1k tokens, {seed_ratio:.2f}x apart",
            "verdict": "reachable on " + ("; ".join(reachable) or "none of the rows"),
            "evidence": (
                f"ideal roofline, TP8 x PP16, largest batch that fits: {at_max}. Memory-bound at "
                "equal batch the H100's cost advantage is "
                + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
                + f"; the seed's {seed_ratio:.2f}x is closest to {closest} "
                f"({ratios[closest]:.2f}x)"
            ),
        },
    ]
