"""`moegpt model summary`: a config's layers, parameter counts and KV-cache cost, on paper.

The model is built on the meta device (shapes without storage), so the summary of the seed's
1.8T-parameter model costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.table import Table

from moegpt.config import ModelConfig
from moegpt.console import human
from moegpt.model import ParamCount, Transformer
from moegpt.model.transformer import count_parameters


@dataclass(frozen=True)
class LayerRange:
    """Consecutive layers of identical shape, counted per layer."""

    first: int
    last: int
    kind: str
    attention: int
    ffn_total: int
    ffn_active: int


@dataclass(frozen=True)
class ModelSummary:
    layers: list[LayerRange]
    params: ParamCount
    kv_bytes_per_token: int  # bf16, this model's KV heads
    kv_bytes_per_token_mha: int  # bf16, the same model with one KV head per query head


def summarize(config: ModelConfig) -> ModelSummary:
    with torch.device("meta"):
        model = Transformer(config)
    ranges: list[LayerRange] = []
    for i, block in enumerate(model.layers.values()):
        attention, _ = count_parameters(block.attention, config)
        attention += block.attention_norm.weight.numel()
        ffn_total, ffn_active = count_parameters(block.ffn, config)
        norm = block.ffn_norm.weight.numel()
        kind = f"MoE {config.n_experts}x top-{config.top_k}" if config.is_moe_layer(i) else "dense"
        row = LayerRange(i, i, kind, attention, ffn_total + norm, ffn_active + norm)
        prev = ranges[-1] if ranges else None
        if prev and (prev.kind, prev.attention, prev.ffn_total) == (kind, attention, row.ffn_total):
            ranges[-1] = LayerRange(prev.first, i, kind, attention, prev.ffn_total, prev.ffn_active)
        else:
            ranges.append(row)
    return ModelSummary(
        layers=ranges,
        params=model.num_params(),
        kv_bytes_per_token=config.kv_cache_bytes_per_token(2),
        kv_bytes_per_token_mha=config.kv_cache_bytes_per_token(2, n_kv_heads=config.n_heads),
    )


def summary_table(summary: ModelSummary) -> Table:
    table = Table(title="layers (parameters per layer)")
    for column in ("layers", "kind", "attention", "ffn total", "ffn active"):
        table.add_column(column, justify="left" if column in ("layers", "kind") else "right")
    for r in summary.layers:
        span = str(r.first) if r.first == r.last else f"{r.first}-{r.last}"
        table.add_row(span, r.kind, human(r.attention), human(r.ffn_total), human(r.ffn_active))
    return table


def summary_lines(summary: ModelSummary) -> list[str]:
    p = summary.params
    ratio = summary.kv_bytes_per_token_mha / summary.kv_bytes_per_token
    return [
        f"parameters: {human(p.total)} total ({p.total:,}), {human(p.active)} active per token "
        f"({p.active:,}), {human(p.embedding)} in embeddings",
        f"KV cache per token (bf16): {summary.kv_bytes_per_token:,} bytes; "
        f"{summary.kv_bytes_per_token_mha:,} with full multi-head attention ({ratio:g}x more)",
    ]
