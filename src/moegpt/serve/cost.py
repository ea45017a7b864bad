"""The step-time model the scheduler sizes steps with, fitted to measured steps."""

from __future__ import annotations

import bisect
import functools
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

# One measured step: (tokens, attention keys, sequences, mixed, seconds); ``mixed`` is 1 when the
# step runs more than one-token decodes (prefill chunks, verifications), 0 otherwise.
Sample = tuple[int, int, int, int, float]

# Recent decode steps of one batch size whose median times it (the machine drifts as it runs).
DECODE_WINDOW = 16


@dataclass
class StepCostModel:
    """Predicted step seconds = base + per_token x tokens + per_key x attention keys read
    (sum over sequences of new tokens x their context) + per_sequence x sequences (the
    per-sequence attention calls and bookkeeping) + per_mixed_step when the step runs more
    than one-token decodes (on a GPU such a step leaves the captured decode graphs for the
    eager forward, whose kernel launches cost a fixed time of their own).

    A decode step's time is a staircase in its batch, not a line: a GPU replays the graph of
    the next padded batch size, and past a size the experts switch kernels (small-moe on an
    H200: 1.0 ms up to 4 sequences, 1.2 ms up to 8, 1.8 ms from 9). ``decode_seconds``
    holds the measured time of decode steps by batch size; a decode step is predicted the
    larger of the line and the measured time of the smallest batch at least as large (the
    line alone underestimated the step past each riser, and the latency bound admitted
    sequences the target could not hold)."""

    base: float
    per_token: float
    per_key: float
    per_sequence: float = 0.0
    per_mixed_step: float = 0.0
    decode_seconds: dict[int, float] = field(default_factory=dict)  # fixed once built

    @functools.cached_property
    def _batches(self) -> list[int]:
        return sorted(self.decode_seconds)  # predict runs per sequence per step

    def predict(self, tokens: int, keys: int, sequences: int, mixed: bool = False) -> float:
        line = (
            self.base
            + self.per_token * tokens
            + self.per_key * keys
            + self.per_sequence * sequences
            + self.per_mixed_step * mixed
        )
        if mixed or not self.decode_seconds:
            return line
        batches = self._batches
        at = bisect.bisect_left(batches, sequences)
        return line if at == len(batches) else max(line, self.decode_seconds[batches[at]])

    @classmethod
    def fit(cls, samples: list[Sample]) -> StepCostModel:
        """The line by non-negative least squares over measured steps
        (:func:`fit_step_law`), and each decode batch size's median time over its latest
        ``DECODE_WINDOW`` samples (``samples`` in the order measured)."""
        decodes: defaultdict[int, list[float]] = defaultdict(list)
        for _, _, sequences, mixed, seconds in samples:
            if not mixed:
                decodes[sequences].append(seconds)
        decode_seconds = {
            n: statistics.median(times[-DECODE_WINDOW:]) for n, times in decodes.items()
        }
        a = np.array([[1.0, t, k, n, m] for t, k, n, m, _ in samples])
        y = np.array([s for *_, s in samples])
        return cls(*map(float, fit_step_law(a, y)), decode_seconds=decode_seconds)


def fit_step_law(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares of ``y`` on the columns of ``a`` (base, tokens, keys,
    sequences, mixed), over the columns the samples can tell apart: a column that is a
    combination of those before it (steps of one-token decodes have as many tokens as
    sequences; steps all of one batch size have as many as the base) gets 0, so the time it
    cannot be told from stays with the earlier column instead of being split among them."""
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    unit = a / scale  # comparable columns: keys run to millions, the base is 1
    kept: list[int] = []
    for j in range(unit.shape[1]):
        basis = unit[:, kept]
        column = unit[:, j]
        rest = column - basis @ np.linalg.lstsq(basis, column, rcond=None)[0] if kept else column
        if np.linalg.norm(rest) > 1e-9:
            kept.append(j)
    coef = np.zeros(a.shape[1])
    if kept:
        coef[kept] = nnls(unit[:, kept], y)
    return coef / scale


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Lawson and Hanson's active-set method: argmin ||a x - y|| subject to x >= 0, for
    full-rank ``a`` of a few well-scaled columns."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tolerance = 1e-12 * max(float(np.abs(a.T @ y).max(initial=0.0)), 1.0)
    for _ in range(3 * n):
        gradient = a.T @ (y - a @ x)
        if passive.all() or gradient[~passive].max() <= tolerance:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, gradient)))] = True
        while True:
            trial = np.zeros(n)
            trial[passive] = np.linalg.lstsq(a[:, passive], y, rcond=None)[0]
            if (trial[passive] > 0).all():
                x = trial
                break
            # step towards the trial until a coefficient reaches 0; release those that do
            leaving = passive & (trial <= 0)
            step = np.min(x[leaving] / (x[leaving] - trial[leaving]))
            x = x + step * (trial - x)
            passive &= x > tolerance
            x[~passive] = 0.0
    return x
