"""Parameter counts by component, in closed form from a ModelConfig (no model is built)."""

from __future__ import annotations

from dataclasses import dataclass

from moegpt.config import ModelConfig


@dataclass(frozen=True)
class ParamBreakdown:
    embedding: int  # input embedding + untied output head
    attention: int  # q, k, v, o projections over all layers
    experts: int  # all experts of all MoE layers
    router: int  # the gates of all MoE layers
    dense_ffn: int  # feed-forward of dense layers
    norms: int  # RMSNorm gains (two per layer + final)
    expert_per_layer: int  # one expert of one layer
    active_experts: int  # the top_k experts a token uses, over all MoE layers
    embedding_tied: bool

    @property
    def total(self) -> int:
        return (
            self.embedding
            + self.attention
            + self.experts
            + self.router
            + self.dense_ffn
            + self.norms
        )

    @property
    def active(self) -> int:
        """Parameters one token's forward touches."""
        return self.total - self.experts + self.active_experts

    @property
    def output_head(self) -> int:
        """Parameters of the output projection (a matmul, unlike the input lookup)."""
        return self.embedding if self.embedding_tied else self.embedding // 2


def attention_params_per_layer(c: ModelConfig) -> int:
    q_and_o = 2 * c.d_model * c.n_heads * c.head_dim
    k_and_v = 2 * c.d_model * c.n_kv_heads * c.head_dim
    return q_and_o + k_and_v


def ffn_params(c: ModelConfig, hidden: int) -> int:
    matrices = 3 if c.activation == "swiglu" else 2
    return matrices * c.d_model * hidden


def param_breakdown(c: ModelConfig) -> ParamBreakdown:
    moe_layers = c.n_moe_layers
    dense_layers = c.n_layers - moe_layers
    expert = ffn_params(c, c.expert_hidden_size)
    return ParamBreakdown(
        embedding=c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2),
        attention=c.n_layers * attention_params_per_layer(c),
        experts=moe_layers * c.n_experts * expert,
        router=moe_layers * c.d_model * c.n_experts,
        dense_ffn=dense_layers * ffn_params(c, c.ffn_hidden),
        norms=(2 * c.n_layers + 1) * c.d_model,
        expert_per_layer=expert,
        active_experts=moe_layers * c.top_k * expert,
        embedding_tied=c.tie_embeddings,
    )
