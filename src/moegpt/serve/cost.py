"""The step-time model the scheduler sizes steps with, fitted to measured steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# One measured step: (tokens, attention keys, sequences, mixed, seconds); ``mixed`` is 1 when the
# step runs more than one-token decodes (prefill chunks, verifications), 0 otherwise.
Sample = tuple[int, int, int, int, float]


@dataclass
class StepCostModel:
    """Predicted step seconds = base + per_token x tokens + per_key x attention keys read
    (sum over sequences of new tokens x their context) + per_sequence x sequences (the
    per-sequence attention calls and bookkeeping) + per_mixed_step when the step runs more
    than one-token decodes (on a GPU such a step leaves the captured decode graphs for the
    eager forward, whose kernel launches cost a fixed time of their own)."""

    base: float
    per_token: float
    per_key: float
    per_sequence: float = 0.0
    per_mixed_step: float = 0.0

    def predict(self, tokens: int, keys: int, sequences: int, mixed: bool = False) -> float:
        return (
            self.base
            + self.per_token * tokens
            + self.per_key * keys
            + self.per_sequence * sequences
            + self.per_mixed_step * mixed
        )

    @classmethod
    def fit(cls, samples: list[Sample]) -> StepCostModel:
        """Non-negative least squares over measured steps (a coefficient that comes out
        negative is dropped and the rest refitted)."""
        a = np.array([[1.0, t, k, n, m] for t, k, n, m, _ in samples])
        y = np.array([s for *_, s in samples])
        active = list(range(a.shape[1]))
        coef = np.zeros(a.shape[1])
        while active:
            solution = np.linalg.lstsq(a[:, active], y, rcond=None)[0]
            if (solution >= 0).all():
                coef[active] = solution
                break
            active.pop(int(np.argmin(solution)))
        return cls(*map(float, coef))
