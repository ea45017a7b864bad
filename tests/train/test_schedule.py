"""Batch-size ramp-up and learning-rate schedules against hand-written sequences."""

from __future__ import annotations

import math

import pytest

from moegpt.config import TrainConfig
from moegpt.errors import ConfigError
from moegpt.plan.schedule import batch_phases, build_schedule, ramp_batch_size


def test_ramp_follows_megatrons_rule() -> None:
    # 4 -> 16 in steps of 4 over 48 sequences: one increase per 48 / 3 = 16 sequences
    train = TrainConfig(
        steps=10,
        global_batch_size=16,
        micro_batch_size=4,
        ramp_start_batch=4,
        ramp_increment=4,
        ramp_samples=48,
        warmup_steps=0,
    )
    schedule = build_schedule(train)
    assert schedule.batch_sizes.tolist() == [4, 4, 4, 4, 8, 8, 12, 12, 16, 16]
    assert schedule.total_sequences == 4 * 4 + 8 * 2 + 12 * 2 + 16 * 2
    assert [(p.first_step, p.last_step, p.batch_size) for p in batch_phases(schedule)] == [
        (0, 3, 4),
        (4, 5, 8),
        (6, 7, 12),
        (8, 9, 16),
    ]
    assert ramp_batch_size(10**9, 4, 4, 48, 16) == 16
    assert ramp_batch_size(0, 0, 0, 0, 16) == 16  # no ramp


def test_no_ramp_warmup_is_linear_in_steps_then_cosine_to_the_floor() -> None:
    train = TrainConfig(
        steps=20, global_batch_size=8, micro_batch_size=8, lr=1.0, min_lr_ratio=0.1, warmup_steps=4
    )
    s = build_schedule(train)
    assert [s.lr(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # decay by sequences after warm-up: step k has progress (k - 4) / 16
    for k in (4, 9, 12, 19):
        progress = (k - 4) / 16
        assert s.lr(k) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_constant_and_wsd() -> None:
    base = dict(
        steps=10, global_batch_size=8, micro_batch_size=8, lr=2.0, warmup_steps=0, min_lr_ratio=0.0
    )
    constant = build_schedule(TrainConfig(**base, lr_schedule="constant"))
    assert set(constant.lrs.tolist()) == {2.0}
    wsd = build_schedule(TrainConfig(**base, lr_schedule="wsd", wsd_decay_fraction=0.5))
    assert wsd.lrs[:6].tolist() == [2.0] * 6  # stable through progress 0.5
    assert wsd.lrs[6:].tolist() == pytest.approx([1.6, 1.2, 0.8, 0.4])


def test_learning_rate_follows_sequences_through_a_ramp() -> None:
    train = TrainConfig(
        steps=10,
        global_batch_size=16,
        micro_batch_size=4,
        ramp_start_batch=4,
        ramp_increment=4,
        ramp_samples=48,
        warmup_steps=0,
        lr=1.0,
        lr_schedule="cosine",
        min_lr_ratio=0.0,
    )
    s = build_schedule(train)
    for step in range(10):  # progress is sequences consumed over the run's 88, not steps
        expected = 0.5 * (1 + math.cos(math.pi * s.consumed_before[step] / 88))
        assert s.lr(step) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ramp_start_batch": 16}, "train.ramp_start_batch: 16 must be below"),
        (
            {"ramp_start_batch": 4, "ramp_increment": 5, "ramp_samples": 8},
            "train.ramp_increment: 5 must divide",
        ),
        (
            {"ramp_start_batch": 2, "ramp_increment": 2, "ramp_samples": 8},
            "train.ramp_start_batch: must be a multiple of train.micro_batch_size (4)",
        ),
        ({"ramp_start_batch": 4, "ramp_increment": 4}, "train.ramp_samples: must be positive"),
    ],
)
def test_bad_ramps_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(global_batch_size=16, micro_batch_size=4, **fields)
    assert str(info.value).startswith(message)
