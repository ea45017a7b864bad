"""num_params() against closed-form counts written out here."""

from __future__ import annotations

import pytest
import torch

from moegpt.model import Transformer
from tests.conftest import small_config


def closed_form(
    v, d, layers, heads, kv_heads, ffn, experts, top_k, expert_ffn, dense_layers, matrices, tied
):
    head_dim = d // heads
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    norms = 2 * d
    dense_ffn = matrices * d * ffn
    expert = matrices * d * expert_ffn
    router = d * experts
    moe_layers = layers - dense_layers
    embedding = v * d * (1 if tied else 2)
    shared = embedding + layers * (attention + norms) + dense_layers * dense_ffn + d
    total = shared + moe_layers * (router + experts * expert)
    active = shared + moe_layers * (router + top_k * expert)
    return total, active, embedding


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_experts=0, n_kv_heads=4),  # dense multi-head
        dict(n_experts=0, n_kv_heads=1, tie_embeddings=True),  # dense MQA, tied
        dict(n_experts=4, top_k=2, n_kv_heads=1),  # MoE MQA
        dict(n_experts=8, top_k=2, n_kv_heads=2, expert_hidden=24, first_k_dense=1, n_layers=3),
        dict(n_experts=16, top_k=1, activation="gelu", n_kv_heads=1),
    ],
)
def test_num_params_matches_closed_form(kw: dict) -> None:
    c = small_config(**kw)
    dense_layers = c.n_layers if c.n_experts == 0 else c.first_k_dense
    total, active, embedding = closed_form(
        c.vocab_size,
        c.d_model,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.ffn_hidden,
        c.n_experts,
        c.top_k,
        c.expert_hidden or c.ffn_hidden,
        dense_layers,
        3 if c.activation == "swiglu" else 2,
        c.tie_embeddings,
    )
    counted = Transformer(c).num_params()
    assert (counted.total, counted.active, counted.embedding) == (total, active, embedding)
    assert counted.total == sum(p.numel() for p in Transformer(c).parameters())


def test_num_params_on_meta_device_for_the_seed_model() -> None:
    from moegpt.config import load_config

    c = load_config("configs/gpt4-1.8t.toml").model
    with torch.device("meta"):
        counted = Transformer(c).num_params()
    total, active, _ = closed_form(100277, 15360, 120, 120, 1, 30720, 16, 2, 30720, 0, 2, False)
    assert (counted.total, counted.active) == (total, active)
    assert 1.85e12 < total < 1.9e12 and 2.8e11 < active < 2.9e11  # SPEC.md: ~1.87T, ~286B
