"""The dense feed-forward layer and the activation it shares with the experts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import ModelConfig
from moegpt.model.expert_gemv import DecodeLinear


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
        self.w1 = DecodeLinear(config.d_model, hidden)
        if config.activation == "swiglu":
            self.w3 = DecodeLinear(config.d_model, hidden)
        self.w2 = DecodeLinear(hidden, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(gated_activation(self.activation, lambda name: getattr(self, name)(x)))
