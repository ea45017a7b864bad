"""Grouped-query attention on ``scaled_dot_product_attention``; n_kv_heads = 1 is MQA."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from moegpt.config import ModelConfig
from moegpt.model.expert_gemv import DecodeLinear, dense_gemv
from moegpt.model.rope import apply_rope


def causal_mask(new_tokens: int, past_tokens: int, device: torch.device) -> torch.Tensor:
    """Boolean (new, past + new) mask: query i sees keys 0 .. past + i."""
    query_pos = torch.arange(new_tokens, device=device).unsqueeze(1) + past_tokens
    key_pos = torch.arange(past_tokens + new_tokens, device=device).unsqueeze(0)
    return key_pos <= query_pos


# Attention with an explicit mask does not run on cuDNN's kernel. Under torch 2.11 on Hopper
# its backward returns NaN query gradients when a mask is given, the key length is 64 past a
# multiple of 128 and a row's scores are all very negative (pytorch/pytorch#196678): the
# vision stage's cross-attention, whose key length is 32 visual tokens times the batch's most
# images, skipped updates for it. cuDNN also plans every new shape and mask on the host.
NON_CUDNN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    if mask is not None:
        return masked_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=past == 0 and new > 1, enable_gqa=k.shape[1] != q.shape[1]
    )


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """SDPA with a boolean ``mask`` (True: may attend), on a GPU on any kernel but cuDNN's
    (see :data:`NON_CUDNN_BACKENDS`; elsewhere the caller's choice of kernels stands);
    ``k``/``v`` may have fewer heads than ``q``."""
    gqa = k.shape[1] != q.shape[1]
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    with sdpa_kernel(NON_CUDNN_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


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
        self.wq = DecodeLinear(config.d_model, config.n_heads * self.head_dim)
        self.wk = DecodeLinear(config.d_model, config.n_kv_heads * self.head_dim)
        self.wv = DecodeLinear(config.d_model, config.n_kv_heads * self.head_dim)
        self.wo = DecodeLinear(config.n_heads * self.head_dim, config.d_model)
        # After fuse_projections: wq, wk and wv as rows of one matrix (not in the state dict).
        self.register_buffer("qkv_weight", None, persistent=False)
        self.qkv_widths: tuple[int, int, int] = (0, 0, 0)
        self.register_load_state_dict_post_hook(Attention._fuse_after_load)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Make wq, wk and wv row views of one matrix that a single matmul reads when no
        gradient is wanted: a decode step launches one kernel for them, not three. Names,
        values and the state dict stay as they were, an in-place update of any of the three
        is seen by the fused matrix, and the fusion is redone after ``.to()`` or a
        ``load_state_dict`` that replaces the weights (``assign=True``). With gradients on,
        the three projections run as before, so training still reaches each weight."""
        projections = (self.wq, self.wk, self.wv)
        fused = torch.cat([proj.weight.detach() for proj in projections])
        widths = tuple(proj.weight.shape[0] for proj in projections)
        for proj, rows in zip(projections, fused.split(widths), strict=True):
            proj.weight = nn.Parameter(rows, requires_grad=proj.weight.requires_grad)
        self.qkv_weight = fused
        self.qkv_widths = widths

    def _apply(self, fn: Any, recurse: bool = True) -> Attention:
        # A conversion copies the weights and the fused matrix apart: fuse the new weights.
        super()._apply(fn, recurse)
        if self.qkv_weight is not None:
            self.fuse_projections()
        return self

    @staticmethod
    def _fuse_after_load(module: nn.Module, _incompatible: Any) -> None:
        if isinstance(module, Attention) and module.qkv_weight is not None:
            module.fuse_projections()  # assign=True gave the weights storage of their own

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
        if self.qkv_weight is not None and not torch.is_grad_enabled():
            projected = dense_gemv(x, self.qkv_weight).split(self.qkv_widths, dim=-1)
        else:
            projected = tuple(proj(x) for proj in (self.wq, self.wk, self.wv))
        q, k, v = (self._heads(p) for p in projected)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v)
        else:
            out = prefix_attention(q, k, v, document_mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, q.shape[1] * self.head_dim))
