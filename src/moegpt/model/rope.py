"""Rotary position embedding (RoFormer), in the half-split layout that Llama and Mixtral use.

The first and second halves of each head's channels form the rotated pairs, so checkpoints of
those families load without permuting their query and key projections.
"""

from __future__ import annotations

import torch


def rope_inverse_frequencies(
    head_dim: int, theta: float, device: torch.device | None = None
) -> torch.Tensor:
    """theta^(-2i/d) for i in [0, d/2): one rotation speed per channel pair, in float32."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return theta**-exponents


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape ``positions.shape + (head_dim,)``, float32.

    Computed per forward from the positions (no buffer), so the model can be built on the meta
    device and its weights assigned later without any table to re-create.
    """
    inv_freq = rope_inverse_frequencies(head_dim, theta, positions.device)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape (batch, heads, seq, head_dim) by position; computed in float32.

    ``cos``/``sin`` are (seq, head_dim) or (batch, seq, head_dim).
    """
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
