"""The paged KV cache and the per-step view the model attends through.

Storage is one (blocks x block_size) slot array per layer for keys and one for values, each
slot ``kv_heads x head_dim``: with multi-query attention a slot is one head, so a token costs
``2 x layers x head_dim x bytes`` (:func:`bytes_per_token`), ``n_heads`` times less than
multi-head attention.

Attention runs per sequence: its slots are gathered and SDPA attends over exactly its own
keys, so a sequence's numbers never depend on what else is in the batch (the linear layers
are row-wise), which makes batched greedy decoding token-for-token equal to decoding alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moegpt.config import ModelConfig
from moegpt.model.attention import prefix_attention


def kv_heads_per_rank(config: ModelConfig, tp: int = 1) -> int:
    """K/V heads one tensor-parallel rank caches: its share when they split evenly, else all
    of them (multi-query attention's one head is replicated)."""
    return config.n_kv_heads // tp if config.n_kv_heads % tp == 0 else config.n_kv_heads


def bytes_per_token(config: ModelConfig, dtype: torch.dtype, tp: int = 1) -> int:
    """KV-cache bytes of one token on one rank."""
    heads = kv_heads_per_rank(config, tp)
    return 2 * config.n_layers * heads * config.head_dim * torch.finfo(dtype).bits // 8


class PagedKVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        tp: int = 1,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        heads = kv_heads_per_rank(config, tp)
        shape = (config.n_layers, num_blocks * block_size, heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate ``source`` blocks into ``destination`` blocks."""
        size = self.block_size
        for source, dest in copies:
            for cache in (self.k, self.v):
                cache[:, dest * size : (dest + 1) * size] = cache[
                    :, source * size : (source + 1) * size
                ]


@dataclass
class SequenceSlice:
    """One sequence's share of a step: its tokens ``past .. past + new`` sit at rows
    ``offset .. offset + new`` of the packed batch and at cache ``slots``."""

    offset: int
    new: int
    past: int
    slots: torch.Tensor  # (past + new,) cache slots of every token so far


class PagedStep:
    """What the model sees as its cache for one packed forward (``KVCacheLike``)."""

    def __init__(self, cache: PagedKVCache, sequences: list[SequenceSlice]) -> None:
        self.cache = cache
        self.sequences = sequences
        self.seq_len = 0  # positions are always given explicitly
        self._new_slots = torch.cat([s.slots[s.past :] for s in sequences])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` (1, heads, tokens, d) and ``k``/``v`` (1, kv_heads, tokens, d) of the packed
        batch: store the new keys/values, then attend per sequence."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys[self._new_slots] = k[0].transpose(0, 1).to(keys.dtype)
        values[self._new_slots] = v[0].transpose(0, 1).to(values.dtype)
        outputs = []
        for s in self.sequences:
            sk = keys[s.slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            sv = values[s.slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            outputs.append(prefix_attention(q[:, :, s.offset : s.offset + s.new], sk, sv))
        return torch.cat(outputs, dim=2)

    def advance(self, new_tokens: int) -> None:
        """Positions and lengths live in the scheduler's sequences, not here."""
