"""Grouped-query attention on ``scaled_dot_product_attention``; n_kv_heads = 1 is MQA."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import ModelConfig
from moegpt.model.rope import apply_rope


def causal_mask(new_tokens: int, past_tokens: int, device: torch.device) -> torch.Tensor:
    """Boolean (new, past + new) mask: query i sees keys 0 .. past + i."""
    query_pos = torch.arange(new_tokens, device=device).unsqueeze(1) + past_tokens
    key_pos = torch.arange(past_tokens + new_tokens, device=device).unsqueeze(0)
    return key_pos <= query_pos


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean mask: causal, and only within the same document."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids.unsqueeze(2) == document_ids.unsqueeze(1)
    return (causal & same).unsqueeze(1)


def prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA of the newest ``q`` (b, h, new, d) over ``k``/``v`` (b, kv_heads, past + new, d),
    causal unless ``mask`` is given.

    SDPA's is_causal aligns the mask to the top-left, which is right only without a prefix; one
    new token sees the whole prefix (no mask, so fused kernels apply); a chunk after a prefix
    needs the offset mask.
    """
    new, past = q.shape[2], k.shape[2] - q.shape[2]
    if mask is None and past and new > 1:
        mask = causal_mask(new, past, q.device)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and past == 0 and new > 1,
        enable_gqa=k.shape[1] != q.shape[1],
    )


class KVCacheLike(Protocol):
    """What attention needs from a cache: it stores each layer's new keys and values and
    attends over everything it holds, so a paged cache can use its own layout (see
    :class:`moegpt.model.kv_cache.KVCache` and :mod:`moegpt.serve.paged`)."""

    seq_len: int

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...

    def advance(self, new_tokens: int) -> None: ...


class Attention(nn.Module):
    """Causal self-attention with ``n_heads`` query heads sharing ``n_kv_heads`` K/V heads."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)

    def _heads(self, projected: torch.Tensor) -> torch.Tensor:
        """(batch, seq, heads x head_dim) -> (batch, heads, seq, head_dim)."""
        batch, seq, width = projected.shape
        return projected.view(batch, seq, width // self.head_dim, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCacheLike | None = None,
        document_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``document_mask`` (batch, 1, seq, seq) replaces the causal mask for packed
        sequences whose documents must not attend to each other."""
        batch, seq, _ = x.shape
        # Head counts come from the projections' widths, not the config: under tensor
        # parallelism each rank's wq holds only its share of the heads.
        q, k, v = (self._heads(proj(x)) for proj in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v)
        else:
            out = prefix_attention(q, k, v, document_mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, q.shape[1] * self.head_dim))
