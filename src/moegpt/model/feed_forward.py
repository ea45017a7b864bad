"""The dense feed-forward layer and the activation it shares with the experts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import ModelConfig
from moegpt.model.expert_gemv import dense_gemv, dense_gemv_applies


def gated_activation(activation: str, project_in: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The hidden activation of a feed-forward layer.

    ``project_in(name)`` applies the input projection ``name`` ("w1" gate, "w3" up): SwiGLU is
    silu(w1 x) * (w3 x), GELU is gelu(w1 x) with no up projection.
    """
    if activation == "swiglu":
        return F.silu(project_in("w1")) * project_in("w3")
    return F.gelu(project_in("w1"))


class FeedForward(nn.Module):
    """Position-wise MLP: w2(act(w1 x) [* w3 x])."""

    def __init__(self, config: ModelConfig, hidden: int) -> None:
        super().__init__()
        self.activation = config.activation
        self.w1 = nn.Linear(config.d_model, hidden, bias=False)
        if config.activation == "swiglu":
            self.w3 = nn.Linear(config.d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project("w2", gated_activation(self.activation, lambda n: self._project(n, x)))

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, name)
        if dense_gemv_applies(x, layer.weight):  # a decode step's few rows
            return dense_gemv(x, layer.weight)
        return layer(x)  # the module's call: training's layouts hook into it
