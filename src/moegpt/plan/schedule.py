"""Batch-size ramp-up and the learning-rate schedule, both indexed by sequences consumed.

The ramp follows Megatron's ``rampup_batch_size = [start, increment, samples]``: the global
batch starts at ``start`` sequences and grows by ``increment`` each time another
``samples / ((final - start) / increment)`` sequences have been consumed, until it reaches
the final batch. The learning rate is a function of sequences consumed too (warm-up ends
where step ``warmup_steps`` begins, decay ends with the run), so a ramp changes how many
steps a phase takes but not how much data it sees at each rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moegpt.config import TrainConfig


def ramp_batch_size(consumed: int, start: int, increment: int, samples: int, final: int) -> int:
    """Global batch after ``consumed`` sequences (Megatron's ramp-up rule)."""
    if not start or consumed >= samples:
        return final
    per_increment = samples / ((final - start) // increment)
    return min(start + int(consumed // per_increment) * increment, final)


@dataclass(frozen=True)
class Schedule:
    """Batch size and learning rate of every step of a run."""

    batch_sizes: np.ndarray  # sequences per step
    consumed_before: np.ndarray  # sequences consumed before each step (length steps + 1)
    lrs: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.batch_sizes)

    @property
    def total_sequences(self) -> int:
        return int(self.consumed_before[-1])

    def batch_size(self, step: int) -> int:
        return int(self.batch_sizes[step])

    def lr(self, step: int) -> float:
        return float(self.lrs[step])


def build_schedule(train: TrainConfig) -> Schedule:
    sizes = np.empty(train.steps, dtype=np.int64)
    consumed = 0
    for step in range(train.steps):
        sizes[step] = ramp_batch_size(
            consumed,
            train.ramp_start_batch,
            train.ramp_increment,
            train.ramp_samples,
            train.global_batch_size,
        )
        consumed += sizes[step]
    before = np.concatenate([[0], np.cumsum(sizes)])
    return Schedule(sizes, before, _learning_rates(train, sizes, before))


def _learning_rates(train: TrainConfig, sizes: np.ndarray, before: np.ndarray) -> np.ndarray:
    total = float(before[-1])
    warm = float(before[min(train.warmup_steps, train.steps)])
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    lrs = np.empty(len(sizes))
    for step in range(len(sizes)):
        done = float(before[step] + sizes[step])  # sequences seen once this step is taken
        if done <= warm:
            lrs[step] = peak * done / warm
            continue
        progress = (float(before[step]) - warm) / max(total - warm, 1.0)
        if train.lr_schedule == "constant":
            lrs[step] = peak
        elif train.lr_schedule == "cosine":
            lrs[step] = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        else:  # wsd: warm-up, stable, then a linear decay over the last share of the run
            decay_start = 1 - train.wsd_decay_fraction
            tail = max(progress - decay_start, 0.0) / train.wsd_decay_fraction
            lrs[step] = peak - (peak - floor) * tail
    return lrs


@dataclass(frozen=True)
class Phase:
    """Consecutive steps that share a batch size."""

    first_step: int
    last_step: int
    batch_size: int
    sequences: int  # consumed over the phase


def batch_phases(schedule: Schedule) -> list[Phase]:
    phases: list[Phase] = []
    for step, size in enumerate(schedule.batch_sizes.tolist()):
        if phases and phases[-1].batch_size == size:
            last = phases[-1]
            phases[-1] = Phase(last.first_step, step, size, last.sequences + size)
        else:
            phases.append(Phase(step, step, size, size))
    return phases
