"""The decoder-only language model: embeddings, pre-norm blocks (attention + dense or MoE FFN),
final norm and output head. Plain PyTorch: parallelism is applied from outside."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import ModelConfig
from moegpt.model.attention import Attention, KVCacheLike, document_causal_mask
from moegpt.model.feed_forward import FeedForward
from moegpt.model.moe import GroupedExperts, MoE, MoEStats
from moegpt.model.rope import rope_cos_sin


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back before the gain (as Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn: MoE | FeedForward
        if config.is_moe_layer(layer_idx):
            self.ffn = MoE(config)
        else:
            self.ffn = FeedForward(config, config.ffn_hidden)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCacheLike | None = None,
        document_mask: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, document_mask)
        if isinstance(self.ffn, MoE):
            out, stats = self.ffn(self.ffn_norm(x), padding)
            return x + out, stats
        return x + self.ffn(self.ffn_norm(x)), None


BlockCall = Callable[
    [
        TransformerBlock,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        KVCacheLike | None,
        torch.Tensor | None,
    ],
    tuple[torch.Tensor, MoEStats | None],
]


@dataclass
class ModelOutput:
    """Logits, plus the MoE auxiliary loss to add to the LM loss and per-layer router stats."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe_stats: list[MoEStats] = field(default_factory=list)
    # A loss the model computes itself, summed over its units (the CLIP stage's contrastive
    # loss over images), which training takes in place of the LM loss of ``logits``.
    loss_sum: torch.Tensor | None = None


@dataclass(frozen=True)
class ParamCount:
    total: int  # every parameter (a tied embedding counted once)
    active: int  # those one token's forward uses: all but the (E - k) experts it skips
    embedding: int  # token embedding plus an untied output head


class Transformer(nn.Module):
    """GPT-style decoder with grouped-query attention and optional Mixture-of-Experts layers.

    A pipeline stage is this model with the parts it does not hold removed: without
    ``tok_embeddings`` the forward takes hidden states instead of token ids, and without
    ``norm`` (and the head) it returns hidden states as ``logits``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(config.vocab_size, config.d_model)
        # A dict keyed by layer index keeps parameter names stable when pipeline stages drop
        # some layers (torchtitan does the same).
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(config, i) for i in range(config.n_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(config.d_model, config.norm_eps)
        self.output: nn.Linear | None = (
            None
            if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        self.reset_parameters()

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Serving's layout: each block's Q/K/V projections as one matmul (see
        :meth:`Attention.fuse_projections`); weights and state dict are unchanged."""
        for block in self.layers.values():
            block.attention.fuse_projections()

    def init_parameter(
        self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Fill ``tensor`` (the whole of parameter ``name``) as this model initialises it:
        Normal(0, init_std), projections into the residual scaled by 1/sqrt(2L), unit norms.
        A meta-built model laid out over ranks draws each parameter this way with its own
        ``generator`` (:mod:`moegpt.parallel.init`)."""
        std = self.config.init_std
        if name.endswith("norm.weight"):
            nn.init.ones_(tensor)
        elif name.endswith(("wo.weight", "w2.weight", ".w2")):
            nn.init.normal_(
                tensor, std=std / math.sqrt(2 * self.config.n_layers), generator=generator
            )
        else:
            nn.init.normal_(tensor, std=std, generator=generator)

    def reset_parameters(self) -> None:
        """Initialise every parameter (:meth:`init_parameter`) from the global generator."""
        for name, param in self.named_parameters():
            self.init_parameter(name, param)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCacheLike | None = None,
        document_ids: torch.Tensor | None = None,
        edit_embeddings: Callable[[torch.Tensor], torch.Tensor] | None = None,
        before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        call_block: BlockCall | None = None,
        head: bool = True,
        padding: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for ``tokens`` (batch, seq); with ``head`` false, the final norm's output
        (batch, seq, d_model) in their place (a text tower's features).

        ``positions`` (seq,) or (batch, seq) default to the cache's length onward (0 without a
        cache). With a cache, this step's keys and values are stored and the cache advanced.
        ``document_ids`` (batch, seq) keep packed documents from attending to each other
        (pass positions that restart per document with them). ``padding`` (batch, seq) marks
        tokens that only fill a row, which the MoE layers' statistics and losses leave out.

        A model built around this one (vision's cross-attention) may pass
        ``edit_embeddings(h)``, which returns the residual stream's start from the token
        embeddings, and ``before_layer(i, h)``, which returns layer i's input from the
        residual stream. Both run inside this forward, where a sharded model's weights are
        gathered.

        ``call_block(block, h, cos, sin, cache, mask)`` runs each block in place of calling it
        (a server compiles that one function once for every layer).
        """
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids are for packed training sequences, not cached decoding")
        seq = tokens.shape[1]
        if positions is None:
            start = cache.seq_len if cache is not None else 0
            positions = torch.arange(start, start + seq, device=tokens.device)
        config = self.config
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, config.rope_scaling)

        mask = None if document_ids is None else document_causal_mask(document_ids)
        h = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens)
        if edit_embeddings is not None:
            h = edit_embeddings(h)
        stats: list[MoEStats] = []
        for index, block in self.layers.items():
            if before_layer is not None:
                h = before_layer(int(index), h)
            if call_block is None:
                h, layer_stats = block(h, cos, sin, cache, mask, padding)
            else:
                h, layer_stats = call_block(block, h, cos, sin, cache, mask)
            if layer_stats is not None:
                stats.append(layer_stats)
        if cache is not None:
            cache.advance(seq)
        if self.norm is None:  # a pipeline stage before the last
            logits = h
        elif not head:
            logits = self.norm(h)
        elif self.output is None:  # tied embeddings
            logits = F.linear(self.norm(h), self.tok_embeddings.weight)
        else:
            logits = self.output(self.norm(h))
        # Averaged over MoE layers so the coefficients do not need retuning with depth.
        aux_loss = (
            torch.stack([s.aux_loss for s in stats]).mean() if stats else logits.new_zeros(())
        )
        return ModelOutput(logits=logits, aux_loss=aux_loss, moe_stats=stats)

    def num_params(self) -> ParamCount:
        """Total, active-per-token and embedding parameter counts (works on the meta device)."""
        total, active = count_parameters(self, self.config)
        embedding = self.tok_embeddings.weight.numel()
        if self.output is not None:
            embedding += self.output.weight.numel()
        return ParamCount(total=total, active=active, embedding=embedding)


def count_parameters(module: nn.Module, config: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of any part of the model: a token uses top_k of n_experts."""
    total = active = 0
    for sub in module.modules():
        own = sum(p.numel() for p in sub.parameters(recurse=False))
        total += own
        active += own * config.top_k // config.n_experts if isinstance(sub, GroupedExperts) else own
    return total, active
