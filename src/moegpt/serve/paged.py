"""The paged KV cache and the per-step view the model attends through.

Storage is one (blocks x block_size) slot array per layer for keys and one for values, each
slot ``kv_heads x head_dim``: with multi-query attention a slot is one head, so a token costs
``2 x layers x head_dim x bytes`` (:func:`bytes_per_token`), ``n_heads`` times less than
multi-head attention.

In the batch-invariant mode attention runs per sequence: its slots are gathered and SDPA
attends over exactly its own keys, so a sequence's numbers never depend on what else is in
the batch (the linear layers are row-wise), which makes batched greedy decoding on CPU in fp32
token-for-token equal to decoding alone. The padded mode (the GPU default) attends to all
decoding sequences in one call instead, equal up to rounding.
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
    ``offset .. offset + new`` of the packed batch, and the cache slots of all its
    ``past + new`` tokens at ``start ..`` of the step's flat slot list."""

    offset: int
    new: int
    past: int
    start: int


@dataclass
class DecodeBatch:
    """The step's one-token sequences, attended as one padded batch (device tensors)."""

    rows: torch.Tensor  # (batch,) their rows in the packed batch
    starts: torch.Tensor  # (batch,) where each one's slots begin in the flat slot list
    lengths: torch.Tensor  # (batch,) keys each one attends to
    longest: int

    def attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
    ) -> torch.Tensor:
        """``q`` (1, heads, tokens, d) -> (batch, heads, d) for the decode rows. Each K/V
        head's query heads become the query positions of one SDPA row, so multi-query
        attention reads its one K/V head once per sequence, not once per query head.
        Padding reads slot 0 and is masked out."""
        heads, d = q.shape[1], q.shape[3]
        kv_heads = keys.shape[1]
        batch = self.rows.numel()
        span = torch.arange(self.longest, device=q.device)
        mask = span < self.lengths.unsqueeze(1)
        index = slots[(self.starts.unsqueeze(1) + span).clamp(max=slots.numel() - 1)]
        index = index.masked_fill(~mask, 0)
        q = q[0, :, self.rows].transpose(0, 1)  # (batch, heads, d)
        q = q.reshape(batch, kv_heads, heads // kv_heads, d)
        k = keys[index].transpose(1, 2).to(q.dtype)  # (batch, kv_heads, longest, d)
        v = values[index].transpose(1, 2).to(q.dtype)
        out = prefix_attention(q, k, v, mask[:, None, None, :])
        return out.reshape(batch, heads, d)


class PagedStep:
    """What the model sees as its cache for one packed forward (``KVCacheLike``).

    ``sequences`` attend one by one (a chunk, or with ``decodes`` None also every one-token
    decode: no reduction then depends on the batch, so greedy decoding equals decoding alone
    bit for bit); ``decodes`` attend as one padded batch (one SDPA call for all of them, the
    fast path on a GPU, equal up to rounding).
    """

    def __init__(
        self,
        cache: PagedKVCache,
        slots: torch.Tensor,
        new_slots: torch.Tensor,
        sequences: list[SequenceSlice],
        decodes: DecodeBatch | None = None,
    ) -> None:
        self.cache = cache
        self.seq_len = 0  # positions are always given explicitly
        self.slots = slots
        self.new_slots = new_slots
        self.sequences = sequences
        self.decodes = decodes

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` (1, heads, tokens, d) and ``k``/``v`` (1, kv_heads, tokens, d) of the packed
        batch: store the new keys/values, then attend."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys[self.new_slots] = k[0].transpose(0, 1).to(keys.dtype)
        values[self.new_slots] = v[0].transpose(0, 1).to(values.dtype)
        out = torch.empty_like(q)
        if self.decodes is not None:
            decoded = self.decodes.attend(q, keys, values, self.slots)
            out[0, :, self.decodes.rows] = decoded.transpose(0, 1)
        for s in self.sequences:
            slots = self.slots[s.start : s.start + s.past + s.new]
            sk = keys[slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            sv = values[slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            rows = slice(s.offset, s.offset + s.new)
            out[:, :, rows] = prefix_attention(q[:, :, rows], sk, sv)
        return out

    def advance(self, new_tokens: int) -> None:
        """Positions and lengths live in the scheduler's sequences, not here."""
