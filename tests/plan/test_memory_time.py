"""Training time and memory against closed forms: the ZeRO paper, the pipeline bubble."""

from __future__ import annotations

import pytest

from moegpt.config import ModelConfig
from moegpt.errors import UserError
from moegpt.plan.hardware import PRESETS, get_hardware
from moegpt.plan.memory import (
    LOSS_CHUNK_VALUES,
    TrainLayout,
    activation_bytes_per_token_layer,
    bubble_fraction,
    in_flight_microbatches,
    logit_bytes,
    stage_params,
    training_memory,
)
from moegpt.plan.params import param_breakdown
from moegpt.plan.training import tokens_per_expert, training_time

DENSE = ModelConfig(
    vocab_size=1000, d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=256, n_experts=0
)
MOE = ModelConfig(
    vocab_size=1000,
    d_model=64,
    n_layers=4,
    n_heads=4,
    n_kv_heads=1,
    ffn_hidden=256,
    n_experts=8,
    top_k=2,
)


def zero_paper(psi: float, nd: int, stage: int, k: int = 12) -> float:
    """Rajbhandari et al. 2019, figure 1: model-state bytes per GPU for each ZeRO stage."""
    return {
        0: (2 + 2 + k) * psi,
        1: 2 * psi + 2 * psi + k * psi / nd,
        2: 2 * psi + (2 + k) * psi / nd,
        3: (2 + 2 + k) * psi / nd,
    }[stage]


def test_zero_closed_form_reproduces_the_papers_example() -> None:
    # 7.5B parameters on 64 GPUs: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB
    figures = [zero_paper(7.5e9, 64, s) / 1e9 for s in range(4)]
    assert figures == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dp", [1, 8, 64])
def test_model_states_follow_zero(stage: int, dp: int) -> None:
    layout = TrainLayout(dp=dp, zero_stage=stage, states="mixed", seq_len=16)
    est = training_memory(DENSE, layout, 80e9)
    psi = param_breakdown(DENSE).total
    assert est.weights + est.grads + est.optimizer == pytest.approx(zero_paper(psi, dp, stage))


def test_expert_parallel_divides_experts_only() -> None:
    p = param_breakdown(MOE)
    one = stage_params(MOE, TrainLayout(dp=8))[0]
    ep = stage_params(MOE, TrainLayout(dp=8, ep=4))[0]
    assert one.experts == p.experts and ep.experts == p.experts / 4
    assert one.shared == ep.shared == p.total - p.experts


def test_tensor_parallel_keeps_the_single_kv_head_whole() -> None:
    p = param_breakdown(MOE)
    tp2 = stage_params(MOE, TrainLayout(tp=2))[0]
    kv = MOE.n_layers * 2 * MOE.d_model * MOE.head_dim  # one K and one V head, replicated
    norms_and_router = p.norms + p.router
    assert tp2.shared == pytest.approx(
        (p.total - p.experts - kv - norms_and_router) / 2 + kv + norms_and_router
    )


def test_pipeline_puts_embedding_first_and_head_last() -> None:
    stages = stage_params(DENSE, TrainLayout(pp=2))
    table, d = DENSE.vocab_size * DENSE.d_model, DENSE.d_model
    layer = param_breakdown(DENSE).attention / 4 + 3 * d * 256 + 2 * d
    assert stages[0].shared == 2 * layer + table  # input embedding
    assert stages[1].shared == 2 * layer + table + d  # output head and final norm
    assert [s.layers for s in stages] == [2, 2]
    assert sum(s.shared for s in stages) == param_breakdown(DENSE).total


@pytest.mark.parametrize(
    ("p", "m", "v", "expected"),
    [(4, 8, 1, 3 / 11), (8, 8, 1, 7 / 15), (4, 8, 2, 3 / 19), (1, 4, 1, 0.0)],
)
def test_bubble_is_p_minus_1_over_m_plus_p_minus_1(p, m, v, expected) -> None:
    assert bubble_fraction(p, m, v) == pytest.approx(expected)


def test_activations_by_hand_and_recompute() -> None:
    d, f, k = 64, 256, 2
    attention = 6 * d + 14 * 64 + 12 * 16 + 4 * 4  # 4 query heads, 1 KV head of 16
    assert activation_bytes_per_token_layer(MOE, moe=True) == attention + 10 * d + k * (
        6 * d + 8 * f
    )
    assert activation_bytes_per_token_layer(MOE, moe=False) == attention + 6 * d + 8 * f
    full = training_memory(MOE, TrainLayout(micro_batch=2, seq_len=32), 80e9)
    assert full.activations == 4 * activation_bytes_per_token_layer(MOE, True) * 64
    saved = training_memory(MOE, TrainLayout(micro_batch=2, seq_len=32, recompute=True), 80e9)
    assert saved.activations == (4 * 2 * d + activation_bytes_per_token_layer(MOE, True)) * 64
    assert saved.logits == full.logits == logit_bytes(64 * 1000) == (4 + 12) * 64 * 1000


@pytest.mark.parametrize(
    ("schedule", "stage", "expected"),
    [
        ("1f1b", 0, 4),
        ("1f1b", 1, 3),
        ("1f1b", 3, 1),  # stage s holds min(p - s, m)
        ("gpipe", 0, 16),
        ("gpipe", 3, 16),  # all m micro-batches
        ("interleaved_1f1b", 0, 4 * (1 + 3 / 8)),  # Korthikanti: x (1 + (p-1)/(p v)), v = 2
    ],
)
def test_pipeline_stages_hold_their_in_flight_micro_batches(schedule, stage, expected) -> None:
    layout = TrainLayout(pp=4, pp_microbatches=16, pp_schedule=schedule)
    assert in_flight_microbatches(layout, stage) == pytest.approx(expected)
    assert in_flight_microbatches(TrainLayout(pp=4, pp_microbatches=2), 0) == 2


def test_recompute_keeps_inputs_of_every_in_flight_micro_batch_and_one_block() -> None:
    # GPipe: both stages hold all 8 micro-batches; the last also holds the logits, so it peaks.
    layout = TrainLayout(
        pp=2, pp_microbatches=8, pp_schedule="gpipe", micro_batch=1, seq_len=16, recompute=True
    )
    est = training_memory(DENSE, layout, 80e9)
    one_block = activation_bytes_per_token_layer(DENSE, False)
    assert est.activations == (2 * 64 * 2 * 8 + one_block) * 16  # 2 layers' inputs x 8, 1 block
    assert est.logits == logit_bytes(16 * 1000)


def test_hsdp_shards_over_the_shard_group_only() -> None:
    psi = param_breakdown(DENSE).total
    hsdp = training_memory(DENSE, TrainLayout(dp=8, zero_stage=3, shard_group=4, seq_len=8), 80e9)
    fsdp = training_memory(DENSE, TrainLayout(dp=8, zero_stage=3, seq_len=8), 80e9)
    assert hsdp.weights == pytest.approx(4 * psi / 4) and fsdp.weights == pytest.approx(4 * psi / 8)


def test_fsdp_keeping_gathered_weights_holds_every_layers_bf16_copy() -> None:
    """parallel.reshard_after_forward = false: each layer's gathered bf16 weights stay from
    its forward to its backward, so at the turn the whole model is held in bf16 (2 bytes a
    parameter), against two layers' worth (the current one and the prefetch) otherwise."""
    from moegpt.config import load_config
    from moegpt.plan.plan import PlanOptions, train_layout

    whole = 2 * param_breakdown(DENSE).total
    freed = training_memory(DENSE, TrainLayout(dp=4, zero_stage=3, seq_len=8), 80e9)
    kept = training_memory(
        DENSE, TrainLayout(dp=4, zero_stage=3, seq_len=8, keep_gathered=True), 80e9
    )
    assert kept.gathered_weights == pytest.approx(whole)
    assert freed.gathered_weights == pytest.approx(whole * 2 / DENSE.n_layers)
    assert kept.total - freed.total == pytest.approx(whole - freed.gathered_weights)
    overrides = ["--parallel.dp_shard", "2", "--parallel.reshard_after_forward=false"]
    layout, _ = train_layout(load_config("configs/tiny.toml", overrides), PlanOptions())
    assert layout.keep_gathered and layout.zero_stage == 3


def test_gqa_kv_heads_per_tensor_parallel_rank() -> None:
    from moegpt.plan.memory import kv_heads_per_rank

    gqa = ModelConfig(d_model=64, n_heads=8, n_kv_heads=4, vocab_size=100, n_experts=0)
    assert [kv_heads_per_rank(gqa, tp) for tp in (1, 2, 4, 8)] == [4, 2, 1, 1]


def test_training_time_and_its_reverse() -> None:
    a100 = PRESETS["a100-40g"]
    est = training_time(2.15e25, a100, 25_000, mfu=0.34)
    assert est.seconds == pytest.approx(2.15e25 / (25_000 * 312e12 * 0.34))
    assert est.days == pytest.approx(93.8, abs=0.05)
    assert est.cost(1.0) == pytest.approx(25_000 * est.seconds / 3600)
    back = training_time(2.15e25, a100, 25_000, days=est.days)
    assert back.mfu == pytest.approx(0.34)
    assert tokens_per_expert(60e6, 2, 16) == 7.5e6


def test_bad_inputs_name_the_option() -> None:
    with pytest.raises(UserError, match="^--gpus: must be positive"):
        training_time(1e20, PRESETS["h100-sxm"], -4, mfu=0.4)
    with pytest.raises(UserError, match=r"^--mfu: must be in \(0, 1\]"):
        training_time(1e20, PRESETS["h100-sxm"], 8, mfu=1.5)
    with pytest.raises(UserError, match="^--gpu: unknown hardware 'v100'"):
        get_hardware("v100")
    with pytest.raises(UserError, match="^parallel.tp: 3 does not divide model.n_heads"):
        training_memory(MOE, TrainLayout(tp=3), 80e9)
    with pytest.raises(UserError, match="^parallel.ep: 3 must divide model.n_experts"):
        training_memory(MOE, TrainLayout(ep=3, dp=3), 80e9)
    with pytest.raises(UserError, match="^--precision fp8: a100-40g has no fp8"):
        PRESETS["a100-40g"].peak_flops("fp8")


def test_context_parallel_divides_activations_and_logits_by_cp() -> None:
    """CP4 at 64 tokens holds what one GPU holds at 16, and its model states are sharded."""
    split = training_memory(MOE, TrainLayout(micro_batch=2, seq_len=64, cp=4), 80e9)
    short = training_memory(MOE, TrainLayout(micro_batch=2, seq_len=16), 80e9)
    assert (
        split.activations
        == short.activations
        == 4 * (activation_bytes_per_token_layer(MOE, True) * 2 * 16)
    )
    assert split.logits == short.logits == logit_bytes(2 * 16 * 1000)
    with pytest.raises(UserError, match="^parallel.cp: 3 does not divide data.seq_len"):
        training_memory(MOE, TrainLayout(seq_len=64, cp=3), 80e9)


def test_plan_counts_context_parallel_ranks_and_shards_over_them() -> None:
    from moegpt.config import load_config
    from moegpt.plan.plan import PlanOptions, train_layout

    bf16 = ["--train.dtype", "bfloat16"]  # MQA ring-attends in bf16 only
    overrides = ["--parallel.dp_shard", "2", "--parallel.cp", "4", "--data.seq_len", "256", *bf16]
    layout, gpus = train_layout(load_config("configs/tiny.toml", overrides), PlanOptions())
    assert (gpus, layout.dp, layout.cp, layout.zero_stage, layout.shard_ranks) == (8, 2, 4, 3, 8)
    replicas = [
        "--parallel.dp_replicate",
        "2",
        "--parallel.cp",
        "2",
        "--data.seq_len",
        "256",
        *bf16,
    ]
    layout, gpus = train_layout(load_config("configs/tiny.toml", replicas), PlanOptions())
    assert (gpus, layout.dp, layout.shard_ranks) == (4, 2, 2)  # HSDP: shards over CP only


def test_ring_attention_traffic_by_hand() -> None:
    from moegpt.plan.training import ring_attention

    h100 = PRESETS["h100-sxm"]
    ring = ring_attention(
        MOE, h100, cp=4, tokens_per_gpu=1000, attention_flops_per_token=1e9, mfu=0.5
    )
    kv_per_layer = 1000 * 2 * 16 * 2  # tokens x (K, V) x one head of 16 x bf16
    assert ring.bytes_per_step == 4 * kv_per_layer * 4 * 3  # 4x per hop, 4 layers, 3 hops
    assert ring.comm_seconds == pytest.approx(ring.bytes_per_step / h100.nvlink_bandwidth)
    assert ring.attention_seconds == pytest.approx(1000 * 1e9 / (h100.peak_bf16_flops * 0.5))
    assert ring.exposed_seconds == max(0.0, ring.comm_seconds - ring.attention_seconds)


def test_the_loss_chunk_the_plan_charges_is_the_trainers() -> None:
    """Beyond one chunk, a logit costs its bf16 value and bf16 gradient alone."""
    from moegpt.train.loss import CHUNK_VALUES

    assert LOSS_CHUNK_VALUES == CHUNK_VALUES
    big = 10 * CHUNK_VALUES
    assert logit_bytes(big) == 4 * big + 12 * CHUNK_VALUES
