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


class _PaddedDecodes:
    """The step's one-token sequences as one padded batch: a (batch, longest) slot index
    (padding reads slot 0) and a mask of each row's real keys."""

    def __init__(self, sequences: list[SequenceSlice]) -> None:
        device = sequences[0].slots.device
        self.rows = torch.tensor([s.offset for s in sequences], device=device)
        self.slots = torch.nn.utils.rnn.pad_sequence([s.slots for s in sequences], batch_first=True)
        lengths = torch.tensor([len(s.slots) for s in sequences], device=device)
        longest = self.slots.shape[1]
        self.mask = torch.arange(longest, device=device) < lengths.unsqueeze(1)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``q`` (1, heads, tokens, d) -> (batch, heads, d) for the decode rows. Each K/V
        head's query heads become the query positions of one SDPA row, so multi-query
        attention reads its one K/V head once per sequence, not once per query head."""
        heads, d = q.shape[1], q.shape[3]
        kv_heads = keys.shape[1]
        batch = self.rows.numel()
        q = q[0, :, self.rows].transpose(0, 1)  # (batch, heads, d)
        q = q.reshape(batch, kv_heads, heads // kv_heads, d)
        k = keys[self.slots].transpose(1, 2).to(q.dtype)  # (batch, kv_heads, longest, d)
        v = values[self.slots].transpose(1, 2).to(q.dtype)
        mask = self.mask[:, None, None, :]
        out = prefix_attention(q, k, v, mask)  # (batch, kv_heads, heads / kv_heads, d)
        return out.reshape(batch, heads, d)


class PagedStep:
    """What the model sees as its cache for one packed forward (``KVCacheLike``).

    Chunks of several tokens attend per sequence. One-token (decode) sequences do too when
    ``batch_invariant``, so no reduction depends on the batch and greedy decoding equals
    decoding alone bit for bit; otherwise they attend as one padded batch (one SDPA call for
    all of them, the fast path on a GPU, equal up to rounding).
    """

    def __init__(
        self, cache: PagedKVCache, sequences: list[SequenceSlice], batch_invariant: bool = True
    ) -> None:
        self.cache = cache
        self.seq_len = 0  # positions are always given explicitly
        self._new_slots = torch.cat([s.slots[s.past :] for s in sequences])
        decodes = [] if batch_invariant else [s for s in sequences if s.new == 1]
        self._decodes = _PaddedDecodes(decodes) if len(decodes) > 1 else None
        self.sequences = [s for s in sequences if self._decodes is None or s.new > 1]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` (1, heads, tokens, d) and ``k``/``v`` (1, kv_heads, tokens, d) of the packed
        batch: store the new keys/values, then attend."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys[self._new_slots] = k[0].transpose(0, 1).to(keys.dtype)
        values[self._new_slots] = v[0].transpose(0, 1).to(values.dtype)
        out = torch.empty_like(q)
        if self._decodes is not None:
            out[0, :, self._decodes.rows] = self._decodes.attend(q, keys, values).transpose(0, 1)
        for s in self.sequences:
            sk = keys[s.slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            sv = values[s.slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            rows = slice(s.offset, s.offset + s.new)
            out[:, :, rows] = prefix_attention(q[:, :, rows], sk, sv)
        return out

    def advance(self, new_tokens: int) -> None:
        """Positions and lengths live in the scheduler's sequences, not here."""
