"""`moegpt model summary`: a config's layers, parameter counts and KV-cache cost, on paper.

The model is built on the meta device (shapes without storage), so the summary of the seed's
1.8T-parameter model costs no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.table import Table

from moegpt.config import ModelConfig, VisionConfig
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
class VisionSummary:
    """Parameters vision adds (counted on the built modules)."""

    encoder: int
    resampler: int
    cross_attention: int
    cross_attention_blocks: int
    image_embedding: int


@dataclass(frozen=True)
class ModelSummary:
    layers: list[LayerRange]
    params: ParamCount
    kv_bytes_per_token: int  # bf16, this model's KV heads
    kv_bytes_per_token_mha: int  # bf16, the same model with one KV head per query head
    vision: VisionSummary | None = None


def _size(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize_vision(config: ModelConfig, vision: VisionConfig) -> VisionSummary:
    from moegpt.model.vision import VisionLanguageModel

    with torch.device("meta"):  # the marker's id changes no count
        model = VisionLanguageModel(Transformer(config), vision, image_token_id=0)
    return VisionSummary(
        encoder=_size(model.encoder),
        resampler=_size(model.resampler),
        cross_attention=_size(model.xattn),
        cross_attention_blocks=len(model.xattn),
        image_embedding=model.image_embedding.numel(),
    )


def summarize(config: ModelConfig, vision: VisionConfig | None = None) -> ModelSummary:
    """The model's layers and counts; with ``vision`` enabled, what vision adds too."""
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
        vision=summarize_vision(config, vision) if vision is not None and vision.enabled else None,
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
        *_vision_lines(summary.vision),
    ]


def _vision_lines(v: VisionSummary | None) -> list[str]:
    if v is None:
        return []
    added = v.encoder + v.resampler + v.cross_attention + v.image_embedding
    return [
        f"vision adds {human(added)} ({added:,}): image encoder {human(v.encoder)}, resampler "
        f"{human(v.resampler)}, {v.cross_attention_blocks} gated cross-attention blocks "
        f"{human(v.cross_attention)}"
    ]
