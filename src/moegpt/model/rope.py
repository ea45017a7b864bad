"""Rotary position embedding (RoFormer), in the half-split layout that Llama and Mixtral use.

The first and second halves of each head's channels form the rotated pairs, so checkpoints of
those families load without permuting their query and key projections.

Context extension rescales the rotation speeds (:func:`rope_frequencies`), with the rules of
Hugging Face's ``rope_scaling`` types: ``linear`` divides every speed by the factor s
(position interpolation); ``ntk`` raises the base to theta * s^(d / (d - 2)) (NTK-aware
scaling, which slows low frequencies most); ``yarn`` interpolates only the channel pairs that
turn fewer than ``beta_slow`` times over the original context, keeps those above
``beta_fast``, ramps linearly between, and scales queries and keys by 0.1 ln(s) + 1 (the
attention temperature); ``llama3`` divides wavelengths longer than original / low_freq_factor
by s, keeps those shorter than original / high_freq_factor, and blends between. The attention
factor multiplies the cos and sin tables, so it reaches queries and keys in this one place
for training, cached decoding and the paged engine alike.
"""

from __future__ import annotations

import math

import torch

from moegpt.config import RopeScaling

NO_SCALING = RopeScaling()


def rope_inverse_frequencies(
    head_dim: int, theta: float, device: torch.device | None = None
) -> torch.Tensor:
    """theta^(-2i/d) for i in [0, d/2): one rotation speed per channel pair, in float32."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return theta**-exponents


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScaling = NO_SCALING,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, float]:
    """The rotation speeds under ``scaling`` (float32, one per channel pair) and the factor
    that multiplies queries and keys (1 except for yarn). At factor 1 the speeds are exactly
    the unscaled ones, whatever the type."""
    inv_freq = rope_inverse_frequencies(head_dim, theta, device)
    s = scaling.factor
    attention = 1.0
    if scaling.type == "yarn":
        attention = scaling.attention_factor or (0.1 * math.log(s) + 1.0)
    if s == 1 or scaling.type == "none":
        return inv_freq, attention
    if scaling.type == "linear":
        return inv_freq / s, attention
    if scaling.type == "ntk":
        return rope_inverse_frequencies(
            head_dim, theta * s ** (head_dim / (head_dim - 2)), device
        ), 1.0
    if scaling.type == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling), attention
    return _llama3(inv_freq, scaling), attention


def _yarn(
    inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling
) -> torch.Tensor:
    """NTK-by-parts: pair i turns original / (2 pi / inv_freq[i]) times over the original
    context; the pairs between beta_fast and beta_slow turns blend interpolated and kept
    speeds along a linear ramp (its ends rounded outward to whole pairs, as the paper's code
    and transformers do)."""
    original = scaling.original_max_seq_len

    def pair_turning(rotations: float) -> float:
        """The (fractional) pair index that turns ``rotations`` times over the context."""
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_turning(scaling.beta_fast)), 0)
    high = min(math.ceil(pair_turning(scaling.beta_slow)), head_dim - 1)
    if high == low:
        high += 0.001  # a one-pair ramp, without dividing by zero
    pairs = torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device)
    interpolated = ((pairs - low) / (high - low)).clamp(0, 1)  # 1: slowed by the factor
    return inv_freq / scaling.factor * interpolated + inv_freq * (1 - interpolated)


def _llama3(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1: scale long wavelengths, keep short ones, blend the middle band by where the
    wavelength falls between original / high_freq_factor and original / low_freq_factor."""
    s, original = scaling.factor, scaling.original_max_seq_len
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / s, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / s + smooth * scaled
    middle = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(middle, blended, scaled)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling = NO_SCALING
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape ``positions.shape + (head_dim,)``, float32, times the
    scaling's attention factor.

    Computed per forward from the positions (no buffer), so the model can be built on the meta
    device and its weights assigned later without any table to re-create.
    """
    inv_freq, attention = rope_frequencies(head_dim, theta, scaling, positions.device)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    if attention == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention, angles.sin() * attention


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
