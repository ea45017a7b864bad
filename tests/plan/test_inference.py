"""KV-cache sizing and the decode roofline against hand-computed numbers."""

from __future__ import annotations

import dataclasses

import pytest

from moegpt.config import ModelConfig
from moegpt.errors import UserError
from moegpt.plan.hardware import Hardware
from moegpt.plan.inference import (
    ServeLayout,
    batch_for_cost,
    decode,
    experts_touched_fraction,
    kv_fit,
)
from moegpt.plan.params import param_breakdown

# A toy GPU with round numbers: 1 TFLOP/s, 10 GB, 100 GB/s, $3.6 an hour ($0.001 a second).
TOY = Hardware("toy", 1e12, 2e12, 10e9, 100e9, 10e9, 3.6)
DENSE = ModelConfig(
    vocab_size=1000, d_model=1024, n_layers=8, n_heads=8, n_kv_heads=1, ffn_hidden=4096, n_experts=0
)


def test_kv_fit_by_hand() -> None:
    layout = ServeLayout(tp=1, pp=1, reserve=0.0)
    fit = kv_fit(DENSE, TOY, layout, context=1000)
    weights = param_breakdown(DENSE).total * 2
    per_token = 2 * 8 * 1 * 128 * 2  # K and V, 8 layers, 1 head of 128, bf16
    assert fit.weights_per_gpu == weights
    assert fit.kv_per_sequence == per_token * 1000
    assert fit.max_batch == int((10e9 - weights) // (per_token * 1000))
    mha = kv_fit(DENSE, TOY, layout, context=1000, n_kv_heads=8)
    assert mha.kv_per_sequence == 8 * fit.kv_per_sequence


def test_mqa_kv_head_is_replicated_across_tensor_parallel_ranks() -> None:
    one = kv_fit(DENSE, TOY, ServeLayout(tp=1, pp=1), 1000)
    tp4 = kv_fit(DENSE, TOY, ServeLayout(tp=4, pp=1), 1000)
    assert tp4.kv_per_sequence_per_gpu == one.kv_per_sequence_per_gpu  # 1 head, not splittable
    gqa = dataclasses.replace(DENSE, n_kv_heads=4)
    assert kv_fit(gqa, TOY, ServeLayout(tp=4, pp=1), 1000).kv_per_sequence_per_gpu == (
        one.kv_per_sequence_per_gpu
    )


def test_decode_memory_bound_by_hand() -> None:
    layout = ServeLayout(tp=1, pp=1)
    est = decode(DENSE, TOY, layout, batch=4, context=1000)
    weights = param_breakdown(DENSE).total * 2
    kv = 4 * 1000 * 2 * 8 * 128 * 2
    assert est.bound == "memory"
    assert est.round_time == pytest.approx((weights + kv) / 100e9)
    assert est.tokens_per_second == pytest.approx(4 / est.round_time)
    assert est.cost_per_1k_tokens == pytest.approx(0.001 / est.tokens_per_second * 1000)


def test_decode_compute_bound_at_large_batch() -> None:
    layout = ServeLayout(tp=1, pp=1)
    est = decode(DENSE, TOY, layout, batch=4096, context=1)
    p = param_breakdown(DENSE)
    flops = 4096 * (2 * (p.total - 1000 * 1024 - p.norms) + 4 * 8 * 8 * 128 * 1)
    assert est.bound == "compute"
    assert est.round_time == pytest.approx(flops / 1e12)


def test_pipeline_adds_memory_not_speed() -> None:
    """A micro-batch per stage re-reads that stage's weights: a round costs what one GPU
    reading all weights would (pp x 1/pp), whatever the number of stages."""
    flat = decode(DENSE, TOY, ServeLayout(tp=1, pp=1), batch=8, context=10)
    deep = decode(DENSE, TOY, ServeLayout(tp=1, pp=4), batch=8, context=10)
    assert deep.round_time == pytest.approx(flat.round_time, rel=0.15)  # embeddings uneven


def test_experts_touched_is_the_coverage_probability() -> None:
    moe = dataclasses.replace(DENSE, n_experts=16, top_k=2)
    assert experts_touched_fraction(moe, 1) == pytest.approx(2 / 16)
    assert experts_touched_fraction(moe, 2) == pytest.approx(1 - (14 / 16) ** 2)
    assert experts_touched_fraction(DENSE, 1) == 1.0


def test_batch_for_cost_is_the_smallest_batch_meeting_the_target() -> None:
    layout = ServeLayout(tp=1, pp=1)
    memory_bound = decode(DENSE, TOY, layout, 5, 100)  # cost falls with batch until compute-bound
    assert memory_bound.bound == "memory"
    assert batch_for_cost(DENSE, TOY, layout, 100, memory_bound.cost_per_1k_tokens) == 5
    assert batch_for_cost(DENSE, TOY, layout, 100, memory_bound.cost_per_1k_tokens / 1e6) is None


def test_bad_serving_inputs_name_the_option() -> None:
    with pytest.raises(UserError, match="^--infer-tp: 3 does not divide model.n_heads"):
        ServeLayout(tp=3, pp=1).validate(DENSE)
    with pytest.raises(UserError, match="^--infer-pp: 9 stages exceed"):
        ServeLayout(tp=1, pp=9).validate(DENSE)
    with pytest.raises(UserError, match="^--infer-batch: must be positive"):
        decode(DENSE, TOY, ServeLayout(tp=1, pp=1), 0, 10)
