"""FLOPs per token, from the parameter counts: 2 per multiply-accumulate.

Forward = 2 x (active parameters that multiply: everything but the input embedding lookup) plus
attention's two sequence-length-dependent products (QK^T and AV), 4 * L * H * head_dim per
attended position. Training = 3 x forward (backward is twice forward). For training the
attended positions average (T + 1) / 2 under the causal mask, as FlashAttention computes;
PaLM and torchtitan count the full T (twice this term).
"""

from __future__ import annotations

from dataclasses import dataclass

from moegpt.config import ModelConfig
from moegpt.plan.params import param_breakdown


@dataclass(frozen=True)
class TokenFlops:
    matmul: float  # 2 x active multiplying parameters
    attention: float  # QK^T and AV at the given context
    dense_equivalent_matmul: float  # 2 x all multiplying parameters (every expert used)

    @property
    def forward(self) -> float:
        return self.matmul + self.attention

    @property
    def training(self) -> float:
        return 3 * self.forward

    @property
    def dense_equivalent_forward(self) -> float:
        return self.dense_equivalent_matmul + self.attention


def attention_flops(c: ModelConfig, attended_positions: float) -> float:
    """QK^T and AV for one query over ``attended_positions`` keys, all layers."""
    return 4 * c.n_layers * c.n_heads * c.head_dim * attended_positions


def token_flops(c: ModelConfig, attended_positions: float) -> TokenFlops:
    p = param_breakdown(c)
    lookup = p.embedding - p.output_head  # the input table: gathered, not multiplied
    return TokenFlops(
        matmul=2 * (p.active - lookup - p.norms),
        attention=attention_flops(c, attended_positions),
        dense_equivalent_matmul=2 * (p.total - lookup - p.norms),
    )


def training_token_flops(c: ModelConfig, seq_len: int) -> TokenFlops:
    """Per-token FLOPs of a causal training sequence of ``seq_len`` tokens."""
    return token_flops(c, (seq_len + 1) / 2)
