"""Planner counts: parameters equal the instantiated model's, FLOPs equal hand-computed sums."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from moegpt.config import ModelConfig, load_config
from moegpt.model import Transformer
from moegpt.plan.flops import token_flops, training_token_flops
from moegpt.plan.params import param_breakdown

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "small-moe", "debian", "gpt4-1.8t"])
def test_planner_counts_equal_the_shipped_models(name: str) -> None:
    config = load_config(ROOT / "configs" / f"{name}.toml").model
    device = "cpu" if name == "tiny" else "meta"  # same modules either way; meta saves memory
    with torch.device(device):
        counted = Transformer(config).num_params()
    planned = param_breakdown(config)
    assert (planned.total, planned.active, planned.embedding) == (
        counted.total,
        counted.active,
        counted.embedding,
    )


def random_config(rng: random.Random) -> ModelConfig:
    kv = rng.choice([1, 2, 4])
    heads = kv * rng.choice([1, 2, 3])
    experts = rng.choice([0, 2, 4, 8, 16])
    layers = rng.randint(1, 5)
    return ModelConfig(
        vocab_size=rng.randint(5, 300),
        d_model=heads * 2 * rng.randint(1, 6),
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        ffn_hidden=rng.randint(1, 64),
        activation=rng.choice(["swiglu", "gelu"]),
        n_experts=experts,
        top_k=rng.randint(1, max(experts, 1)),
        expert_hidden=rng.choice([0, rng.randint(1, 40)]),
        first_k_dense=rng.randint(0, layers),
        tie_embeddings=rng.random() < 0.5,
    )


@pytest.mark.parametrize("seed", range(40))
def test_planner_counts_equal_random_models(seed: int) -> None:
    config = random_config(random.Random(seed))
    counted = Transformer(config).num_params()
    planned = param_breakdown(config)
    assert (planned.total, planned.active, planned.embedding) == (
        counted.total,
        counted.active,
        counted.embedding,
    ), config


def test_breakdown_by_component_by_hand() -> None:
    # 2 layers, d 8, 2 heads of 4, 1 KV head, vocab 10, 4 SwiGLU experts of 6, top-2, layer 0 dense
    c = ModelConfig(
        vocab_size=10,
        d_model=8,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        ffn_hidden=5,
        n_experts=4,
        top_k=2,
        expert_hidden=6,
        first_k_dense=1,
    )
    p = param_breakdown(c)
    assert p.embedding == 2 * 10 * 8
    assert p.attention == 2 * (8 * 8 * 2 + 8 * 4 * 2)
    assert p.dense_ffn == 3 * 8 * 5
    assert p.experts == 4 * 3 * 8 * 6
    assert p.router == 8 * 4
    assert p.norms == 5 * 8
    assert p.active == p.total - 2 * 3 * 8 * 6


def test_flops_by_hand() -> None:
    c = ModelConfig(
        vocab_size=10,
        d_model=8,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        ffn_hidden=5,
        n_experts=4,
        top_k=2,
        expert_hidden=6,
        first_k_dense=1,
    )
    matmul_params = (
        10 * 8  # output head (the input table is a lookup)
        + 2 * (8 * 8 * 2 + 8 * 4 * 2)  # attention
        + 3 * 8 * 5  # dense layer
        + 8 * 4
        + 2 * 3 * 8 * 6  # router + the 2 experts a token uses
    )
    f = token_flops(c, attended_positions=100)
    assert f.matmul == 2 * matmul_params
    assert f.attention == 4 * 2 * 2 * 4 * 100  # 4 * layers * heads * head_dim * positions
    assert f.training == 3 * (f.matmul + f.attention)
    assert f.dense_equivalent_matmul == 2 * (matmul_params + 2 * 3 * 8 * 6)
    # causal training attends (T + 1) / 2 positions on average
    assert training_token_flops(c, 9).attention == 4 * 2 * 2 * 4 * 5


def test_seed_model_forward_flops() -> None:
    c = load_config(ROOT / "configs/gpt4-1.8t.toml").model
    p = param_breakdown(c)
    f = token_flops(c, 0)
    assert f.matmul == 2 * (p.active - c.vocab_size * c.d_model - p.norms)
    assert f.matmul == pytest.approx(5.6e11, rel=0.05)  # the seed's ~560 GFLOP
