"""A contiguous key/value cache for prefill and incremental decoding.

The model never owns a cache: callers pass one in. Anything with the same ``seq_len`` /
``update`` / ``advance`` methods works, which is how the serving engine plugs in its paged cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moegpt.model.attention import prefix_attention

if TYPE_CHECKING:
    from moegpt.model.transformer import Transformer


class KVCache:
    """Keys and values of every layer for a batch of sequences that advance together.

    Shapes are (layers, batch, kv_heads, max_len, head_dim): with multi-query attention the
    kv_heads axis is 1, which is the whole point of MQA for serving.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.seq_len = 0

    @classmethod
    def for_model(
        cls,
        model: Transformer,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache shaped for ``model``, on its device and (by default) in its dtype."""
        config, weight = model.config, model.tok_embeddings.weight
        return cls(
            config.n_layers,
            batch_size,
            max_len or config.max_seq_len,
            config.n_kv_heads,
            config.head_dim,
            dtype or weight.dtype,
            weight.device,
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's (batch, kv_heads, new, head_dim) keys/values for ``layer`` and
        attend with ``q`` over the whole prefix."""
        new = k.shape[2]
        end = self.seq_len + new
        if k.shape[:2] != self.k.shape[1:3]:
            raise ValueError(
                f"KV cache holds (batch, kv_heads) = {tuple(self.k.shape[1:3])}, "
                f"got {tuple(k.shape[:2])}"
            )
        if end > self.max_len:
            raise ValueError(
                f"KV cache full: {self.seq_len} + {new} tokens exceed max_len {self.max_len}"
            )
        self.k[layer, :, :, self.seq_len : end] = k
        self.v[layer, :, :, self.seq_len : end] = v
        return prefix_attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end])

    def advance(self, new_tokens: int) -> None:
        """Called by the model once every layer has stored ``new_tokens`` tokens."""
        self.seq_len += new_tokens
