"""Shared test helpers: small model configs and deterministic CPU settings."""

from __future__ import annotations

import pytest
import torch

from moegpt.config import ModelConfig


def small_config(**overrides: object) -> ModelConfig:
    """A model small enough for per-token reference loops: 2 layers, MQA, 4 experts top-2."""
    fields: dict[str, object] = dict(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        ffn_hidden=48,
        n_experts=4,
        top_k=2,
        max_seq_len=64,
        init_std=0.1,
    )
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
