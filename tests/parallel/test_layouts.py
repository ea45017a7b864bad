"""Each parallel layout computes what one process computes (CPU, gloo, fp32), checkpoints
reshard between layouts, and each rank holds the model-state bytes `moegpt plan` predicts."""

from __future__ import annotations

import math

import pytest
import torch

from moegpt.plan.memory import model_state_bytes
from moegpt.plan.plan import PlanOptions, train_layout
from moegpt.train.trainer import build_model
from tests.parallel.conftest import CONTINUATION_LAYOUTS, LAYOUTS, STEPS, Result


def relative_norm_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all parameters together."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    norm = sum(float(b[k].double().square().sum()) for k in b)
    return math.sqrt(diff / norm)


def assert_matches(result: Result, reference: Result) -> None:
    assert len(result.losses) == len(reference.losses) == STEPS
    for got, want in zip(result.losses, reference.losses, strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    # The logged auxiliary loss too (a pipeline's first step once counted its shape-inference
    # forward on placeholder inputs: NaN)
    for got, want in zip(result.aux_losses, reference.aux_losses, strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    assert relative_norm_difference(result.params, reference.params) < 1e-4
    assert result.eval.keys() == reference.eval.keys() and reference.eval
    for key, value in reference.eval.items():
        assert result.eval[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_one_process(layout: str, layout_runs: dict[str, Result]) -> None:
    assert_matches(layout_runs[layout], layout_runs["single"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_starts_from_the_weights_one_process_draws(
    layout: str, layout_runs: dict[str, Result]
) -> None:
    """Built on the meta device, each rank draws only its own shards (its parameters in full
    from per-name generators, one at a time), and they are exactly one process's weights."""
    got, want = layout_runs[layout].initial, layout_runs["single"].initial
    assert got is not None and want is not None and got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)
    built = build_model(layout_runs["single"].config, torch.device("cpu")).state_dict()
    assert all(torch.equal(built[name], want[name]) for name in want)


@pytest.mark.parametrize("layout", CONTINUATION_LAYOUTS)
def test_a_continuation_stage_equals_one_process(
    layout: str, layout_runs: dict[str, Result]
) -> None:
    """Started from a run's checkpoint, its context extended and its embedding frozen: each
    layout loads its shards of the parent and trains as one process does."""
    single = layout_runs["continuation-single"]
    assert_matches(layout_runs[f"continuation-{layout}"], single)
    parent = layout_runs["single"].params  # not the parent, but it shares the initial weights
    assert relative_norm_difference(single.params, parent) > 1e-3  # a different run's end


def test_training_moves_the_parameters(layout_runs: dict[str, Result]) -> None:
    """The equality above is not vacuous: 5 steps move the weights far beyond 1e-4."""
    single = layout_runs["single"]
    initial = build_model(single.config, torch.device("cpu")).state_dict()
    assert single.losses[-1] < single.losses[0]
    assert relative_norm_difference(single.params, initial) > 1e-2


def test_checkpoint_reshards_between_layouts(layout_runs: dict[str, Result]) -> None:
    """TP2 x PP2 for 2 steps -> FSDP over 4 ranks for 2 -> one process for 1, and EP2 -> ZeRO-1
    -> one process: the same losses and weights as never stopping (one process, and the first
    layout throughout)."""
    assert_matches(layout_runs["reshard"], layout_runs["single"])
    assert_matches(layout_runs["reshard"], layout_runs["tp2-pp2"])
    assert_matches(layout_runs["reshard-ep-zero1"], layout_runs["single"])
    assert_matches(layout_runs["reshard-ep-zero1"], layout_runs["ep2"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rank_state_bytes_equal_the_plan(layout: str, layout_runs: dict[str, Result]) -> None:
    ranks, _ = LAYOUTS[layout]
    config = layout_runs[layout].config
    plan_layout, gpus = train_layout(config, PlanOptions())
    assert gpus == ranks
    stages = model_state_bytes(config.model, plan_layout)
    measured = layout_runs[layout].ranks
    per_stage = ranks // config.parallel.pp  # the pipeline dimension is the mesh's outermost
    for rank, got in enumerate(measured):
        want = stages[rank // per_stage]
        assert got["params"] == pytest.approx(want.weights, rel=1e-9), rank
        assert got["grads"] == pytest.approx(want.grads, rel=1e-9), rank
        if not config.parallel.zero1:
            assert got["optimizer"] == pytest.approx(want.optimizer, rel=1e-9), rank
    if config.parallel.zero1:  # whole parameters per rank: equal in sum, close per rank
        total = sum(r["optimizer"] for r in measured)
        assert total == pytest.approx(want.optimizer * ranks, rel=1e-9)
        biggest = max(p.numel() for p in layout_runs[layout].params.values()) * 8
        assert all(abs(r["optimizer"] - want.optimizer) <= biggest for r in measured)
