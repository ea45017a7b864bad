"""Tables for `moegpt plan`: the plan dict (the --json schema) rendered for a terminal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.table import Table

from moegpt.console import human

TEXT_COLUMNS = {
    "figure",
    "component",
    "part",
    "gpu",
    "precision",
    "claim",
    "verdict",
    "evidence",
    "why they differ",
}


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False)
    for column in columns:
        justify = "left" if column in TEXT_COLUMNS else "right"
        table.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def _money(n: float) -> str:
    if n >= 1e3:
        return f"${human(n)}"
    return f"${n:.4f}" if n >= 1e-3 else f"${n:.2e}"


def _ring_rows(ring: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Context parallelism's ring traffic per GPU and step, against its attention compute."""
    if ring is None:
        return []
    return [
        (f"ring attention K/V sent per GPU per step (CP{ring['cp']})", _gb(ring["bytes_per_step"])),
        ("  at NVLink bandwidth", f"{ring['comm_seconds'] * 1e3:,.1f} ms"),
        ("  attention compute it overlaps", f"{ring['attention_seconds'] * 1e3:,.1f} ms"),
        ("  exposed", f"{ring['exposed_seconds'] * 1e3:,.1f} ms"),
    ]


def plan_tables(plan: dict[str, Any]) -> list[Table]:
    inputs, p, f, t = plan["inputs"], plan["parameters"], plan["flops"], plan["training"]
    mem, kv, inf = plan["memory"], plan["kv_cache"], plan["inference"]
    layout, serve = inputs["train_layout"], inputs["serve_layout"]
    gpu, infer_gpu = inputs["train_gpu"]["name"], inputs["infer_gpu"]["name"]
    share = p["active"] / p["total"]
    return [
        _table(
            "Parameters",
            ("component", "count"),
            [
                ("total", f"{human(p['total'])} ({p['total']:,})"),
                ("active per token", f"{human(p['active'])} ({share:.1%} of total)"),
                ("embeddings (input + output)", human(p["embedding"])),
                ("attention", human(p["attention"])),
                ("experts (all)", human(p["experts"])),
                ("one expert, all layers", human(p["per_expert"])),
                ("routers", human(p["router"])),
                ("dense feed-forward", human(p["dense_ffn"])),
                ("norms", human(p["norms"])),
            ],
        ),
        _table(
            f"FLOPs (sequence {inputs['seq_len']})",
            ("figure", "FLOP"),
            [
                ("forward per token (full context)", human(f["forward_per_token"])),
                ("  of which matmuls (2 x active)", human(f["forward_matmul_per_token"])),
                ("  of which attention", human(f["forward_attention_per_token"])),
                ("training per token (3 x forward, causal half)", human(f["training_per_token"])),
                (f"training total, {human(inputs['tokens'])} tokens", human(f["training_total"])),
                (
                    "dense-equivalent forward per token",
                    human(f["dense_equivalent_forward_per_token"]),
                ),
            ],
        ),
        _table(
            f"Training on {t['gpus']:,} x {gpu}",
            ("figure", "value"),
            [
                ("MFU", f"{t['mfu']:.1%}"),
                ("days", f"{t['days']:,.1f}"),
                ("GPU-hours", human(t["gpu_hours"])),
                ("cost", _money(t["cost"])),
                ("tokens per batch", human(t["batch_tokens"])),
                ("tokens per expert per batch", human(t["tokens_per_expert_per_batch"])),
                *_ring_rows(t["ring_attention"]),
            ],
        ),
        _table(
            f"Memory per GPU: TP{layout['tp']} x PP{layout['pp']} x DP{layout['dp']}"
            + (f" x CP{layout['cp']}" if layout["cp"] > 1 else "")
            + ", "
            f"EP{layout['ep']}, ZeRO-{layout['zero_stage']}, micro-batch {layout['micro_batch']} "
            f"x {layout['seq_len']}, recompute {'on' if layout['recompute'] else 'off'}",
            ("part", "bytes"),
            [
                ("weights", _gb(mem["weights"])),
                ("gradients", _gb(mem["grads"])),
                ("optimizer states", _gb(mem["optimizer"])),
                ("activations", _gb(mem["activations"])),
                ("logits and loss", _gb(mem["logits"])),
                ("gathered weights (FSDP)", _gb(mem["gathered_weights"])),
                ("total", _gb(mem["total"])),
                (f"{gpu} memory", _gb(mem["hbm_bytes"])),
                ("fits", "yes" if mem["fits"] else "NO"),
                ("pipeline bubble", f"{mem['bubble']:.1%}"),
            ],
        ),
        _table(
            f"KV cache at {inputs['context']} context: TP{serve['tp']} x PP{serve['pp']} "
            f"on {infer_gpu}, {serve['precision']}",
            ("figure", "this model", "same with MHA"),
            [
                ("bytes per token", f"{kv['bytes_per_token']:,}", f"{kv['bytes_per_token_mha']:,}"),
                ("per sequence", _gb(kv["per_sequence"]), _gb(kv["per_sequence_mha"])),
                ("largest batch per cluster", kv["max_batch"], kv["max_batch_mha"]),
                ("weights per GPU", _gb(kv["weights_per_gpu"]), ""),
                ("free for KV per GPU", _gb(kv["free_per_gpu"]), ""),
            ],
        ),
        _table(
            f"Decode roofline: batch {inf['batch']} at {inf['context']} context "
            f"(MFU cap {serve['mfu']:.0%}, bandwidth {serve['mbu']:.0%})",
            ("figure", "value"),
            [
                ("time per output token", f"{inf['round_time'] * 1e3:.1f} ms"),
                ("tokens/s per cluster", human(inf["tokens_per_second"])),
                ("bound by", inf["bound"]),
                ("FLOP per byte on a GPU", f"{inf['arithmetic_intensity']:.1f}"),
                ("cost per 1k tokens", _money(inf["cost_per_1k_tokens"])),
            ],
        ),
    ]


def vision_table(plan: dict[str, Any]) -> Table:
    """What vision adds to the model, and its Flamingo stage on the training cluster."""
    v, gpu = plan["vision"], plan["inputs"]["train_gpu"]
    p, f, stage = v["parameters"], v["flops"], v["stage"]
    return _table(
        f"Vision: {human(p['total'])} parameters added; Flamingo stage on "
        f"{plan['training']['gpus']:,} x {gpu['name']} at {plan['training']['mfu']:.1%} MFU",
        ("figure", "value"),
        [
            ("image encoder (ViT)", human(p["encoder"])),
            ("Perceiver resampler", human(p["resampler"])),
            ("gated cross-attention (all blocks)", human(p["cross_attention"])),
            ("trained in the Flamingo stage", human(v["trained_parameters"])),
            ("encoder forward per image", f"{human(f['encoder_per_image'])} FLOP"),
            ("cross-attention forward per token", f"{human(f['xattn_per_token'])} FLOP"),
            ("stage training per token (LM frozen)", f"{human(f['stage_per_token'])} FLOP"),
            (
                f"stage: {human(stage['tokens'])} tokens, an image every "
                f"{stage['tokens_per_image']:g}",
                f"{human(stage['flops'])} FLOP",
            ),
            ("  days", f"{stage['days']:,.1f}"),
            ("  GPU-hours", human(stage["gpu_hours"])),
            ("  cost", _money(stage["cost"])),
        ],
    )


def schedule_table(plan: dict[str, Any]) -> Table:
    lr = plan["learning_rate"]
    return _table(
        f"Batch-size schedule (peak learning rate {lr['peak']:.2e} after "
        f"{lr['warmup_steps']:,} warm-up steps)",
        ("steps", "batch (sequences)", "tokens", "learning rate"),
        [
            (
                f"{p['first_step']}-{p['last_step']}",
                p["batch_size"],
                human(p["tokens"]),
                f"{p['lr_start']:.2e} -> {p['lr_end']:.2e}",
            )
            for p in plan["batch_schedule"]
        ],
    )


def seed_tables(seeds: dict[str, Any]) -> list[Table]:
    figures = _table(
        "GPT-4's published figures against the arithmetic",
        ("figure", "seed", "computed", "ratio", "why they differ"),
        [
            (r["figure"], human(r["seed"]), human(r["computed"]), f"{r['ratio']:.3f}", r["note"])
            for r in seeds["figures"]
        ],
    )
    memory = _table(
        "Training memory per GPU in the seed's layout ("
        + seeds["assumptions"]["train_layout"]
        + ")",
        ("gpu", "EP", "recompute", "weights", "grads", "optimizer", "activations", "total", "fits"),
        [
            (
                r["gpu"],
                r["ep"],
                "on" if r["recompute"] else "off",
                _gb(r["weights"]),
                _gb(r["grads"]),
                _gb(r["optimizer"]),
                _gb(r["activations"]),
                _gb(r["total"]),
                "yes" if r["fits"] else "no",
            )
            for r in seeds["training_memory"]
        ],
    )
    kv = _table(
        "KV cache: MQA against MHA, largest batch per 128-GPU cluster (TP8 x PP16, bf16)",
        ("gpu", "context", "per seq MQA", "per seq MHA", "free/GPU", "batch MQA", "batch MHA"),
        [
            (
                r["gpu"],
                r["context"],
                _gb(r["per_sequence_mqa"]),
                _gb(r["per_sequence_mha"]),
                _gb(r["free_per_gpu"]),
                r["max_batch_mqa"],
                r["max_batch_mha"],
            )
            for r in seeds["kv_cache"]
        ],
    )
    cost = _table(
        "Inference cost (ideal roofline, TP8 x PP16)",
        (
            "gpu",
            "precision",
            "context",
            "largest batch",
            "tokens/s",
            "$/1k at that batch",
            "seed $/1k",
            "batch for seed $",
            "reachable",
            "utilisation needed",
        ),
        [
            (
                r["gpu"],
                r["precision"],
                r["context"],
                r["max_batch"],
                human(r["tokens_per_second_at_max_batch"]),
                f"{r['cost_at_max_batch']:.4f}",
                r["seed_cost_per_1k"],
                r["batch_for_seed_cost"] or "never",
                "yes" if r["reachable"] else "no",
                "-" if r["utilisation_needed"] is None else f"{r['utilisation_needed']:.0%}",
            )
            for r in seeds["inference_cost"]
        ],
    )
    claims = _table(
        "The seed's claims",
        ("claim", "verdict", "evidence"),
        [(c["claim"], c["verdict"], c["evidence"]) for c in seeds["claims"]],
    )
    return [figures, memory, kv, cost, claims]
