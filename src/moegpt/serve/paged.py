"""The paged KV cache and the per-step view the model attends through.

Storage is one (blocks x block_size) slot array per layer for keys and one for values, each
slot ``kv_heads x head_dim``: with multi-query attention a slot is one head, so a token costs
``2 x layers x head_dim x bytes`` (:func:`bytes_per_token`), ``n_heads`` times less than
multi-head attention.

In the batch-invariant mode attention runs per sequence: its slots are gathered and SDPA
attends over exactly its own keys, so a sequence's numbers never depend on what else is in
the batch (the linear layers are row-wise), which makes batched greedy decoding on CPU in fp32
token-for-token equal to decoding alone. The padded mode (the GPU default) attends to many
sequences in one call instead, equal up to rounding: on a GPU in half precision every
sequence of an eager step through FlashAttention's variable-length kernel
(:class:`VarlenStep`), elsewhere the step's decodes through one SDPA call
(:class:`PagedStep` with a :class:`DecodeBatch`). :class:`BlockTableStep` is that
batched attention for a uniform step (every sequence runs the same number of new tokens) with
fixed shapes and no host sync, so a CUDA graph can capture it (:mod:`moegpt.serve.graphs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moegpt.config import ModelConfig
from moegpt.model.attention import NON_CUDNN_BACKENDS, prefix_attention

# cuDNN attention builds a plan for every new shape and mask, milliseconds of host time per
# call when each step's decode batch has a new longest context; the other kernels need none.
SDPA_BACKENDS = NON_CUDNN_BACKENDS


def kv_heads_per_rank(config: ModelConfig, tp: int = 1) -> int:
    """K/V heads one tensor-parallel rank caches: its share when they split evenly, else all
    of them (multi-query attention's one head is replicated)."""
    return config.n_kv_heads // tp if config.n_kv_heads % tp == 0 else config.n_kv_heads


def bytes_per_token(config: ModelConfig, dtype: torch.dtype, tp: int = 1) -> int:
    """KV-cache bytes of one token on one rank."""
    heads = kv_heads_per_rank(config, tp)
    return 2 * config.n_layers * heads * config.head_dim * torch.finfo(dtype).bits // 8


@torch.library.custom_op("moegpt::store_kv", mutates_args=("keys", "values"))
def store_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    layer: int,
    slots: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
) -> None:
    """Write ``new_keys``/``new_values`` (tokens, kv_heads, d) into cache ``slots`` of
    ``layer`` in place (``keys``/``values``: (layers, slots, kv_heads, d)).

    An opaque operator so that ``torch.compile`` writes the few new slots where they are: traced
    as an index assignment into a view of the cache, the step would be functionalised into a
    copy of the whole cache per layer (milliseconds a step, measured on an H100). It takes the
    whole cache and the layer rather than the layer's view: compiled by block with the layer
    as an input, a mutated view was written back to the wrong layer (torch 2.13, CPU).
    """
    keys[layer, slots] = new_keys.to(keys.dtype)
    values[layer, slots] = new_values.to(values.dtype)


def flash_applies(cache: PagedKVCache) -> bool:
    """Whether attention over ``cache`` can run FlashAttention-2's variable-length kernel: in
    half precision on an Ampere or newer GPU, for a head size that is a multiple of 8 up to
    256 (the aten op does not pad heads as SDPA does; there is no fp32 or CPU kernel)."""
    k = cache.k
    if k.device.type != "cuda" or k.dtype not in (torch.float16, torch.bfloat16):
        return False
    head = k.shape[-1]
    return head % 8 == 0 and head <= 256 and torch.cuda.get_device_capability(k.device) >= (8, 0)


def flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    seqused_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlashAttention-2 over packed sequences: sequence i's queries are rows ``cu_q[i] ..
    cu_q[i + 1]`` of ``q`` (tokens, heads, d) and its keys rows ``cu_k[i] .. cu_k[i + 1]`` of
    ``k``/``v`` (keys, kv_heads, d), the first ``seqused_k[i]`` of them if given; causal with
    the last query aligned to the last key (a chunk after a cached prefix). Offsets int32.

    The aten op because torch 2.11 has no public variable-length entry point (torch 2.13's
    ``torch.nn.attention.varlen`` wraps the same kernel).
    """
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, seqused_k=seqused_k
    )[0]


@torch.library.custom_op("moegpt::block_table_flash_attention", mutates_args=())
def block_table_flash_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    block_tables: torch.Tensor,
    key_counts: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    q_len: int,
) -> torch.Tensor:
    """FlashAttention-2's variable-length kernel for ``q`` (batch * q_len, heads, d), token
    major, each sequence over the whole blocks its ``block_tables`` row names in ``keys``/
    ``values`` (blocks, block_size, kv_heads, d), up to its ``key_counts`` keys; causal aligns
    its last query with its last key. ``cu_q``/``cu_k`` (batch + 1,) int32 are the offsets of
    each sequence's queries and gathered window (``q_len`` and the window apart; the step makes
    them once for every layer). Returns (batch * q_len, heads, d).

    An opaque operator, so that a compiled step attends with exactly the uncompiled step's
    code (ATen's index kernel for the window gather, then this kernel), which the GPU
    benchmark checks against the per-sequence path. Measured on H100s against letting
    inductor generate the gather, it was neither clearly faster nor slower (704 against 813
    tokens/s at batch 1, 57.5k against 52.2k at batch 256; two machines).
    """
    window = block_tables.shape[1] * keys.shape[1]
    k = keys[block_tables].flatten(0, 2).to(q.dtype)  # (batch * window, kv_heads, d)
    v = values[block_tables].flatten(0, 2).to(q.dtype)
    return flash_varlen(q, k, v, cu_q, cu_k, q_len, window, key_counts)


@block_table_flash_attention.register_fake
def _block_table_flash_attention_shape(q: torch.Tensor, *_: object) -> torch.Tensor:
    """The output for tracing: shaped and strided as the queries (as ATen's own meta of the
    kernel makes it; the other inputs don't change it)."""
    return torch.empty_like(q)


class PagedKVCache:
    """``num_blocks`` blocks for the allocator; with ``spare_block`` one more past them,
    ``scratch_block``, that no sequence owns: the padding rows of a graph-captured step write
    their keys and values there."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        tp: int = 1,
        spare_block: bool = False,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks if spare_block else None
        heads = kv_heads_per_rank(config, tp)
        slots = (num_blocks + spare_block) * block_size
        shape = (config.n_layers, slots, heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def store(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a step's new keys and values (1, kv_heads, tokens, d) to ``slots`` of
        ``layer``; that layer's keys and values (slots, kv_heads, d), the new ones included."""
        store_kv(self.k, self.v, layer, slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        return self.k[layer], self.v[layer]

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


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of ``q`` (batch, heads, new, d), each sequence over its window of ``k``/``v``
    (batch, window, kv_heads, d) under ``mask`` (batch, new, window; boolean, or additive in
    ``q``'s dtype); returns (batch, heads, new, d).

    Each K/V head's query heads, times the new tokens, become the query rows of one SDPA row,
    so multi-query attention reads its one K/V head once per sequence, not once per query head.
    """
    batch, heads, new, d = q.shape
    kv_heads = k.shape[2]
    rows = heads // kv_heads * new
    k = k.transpose(1, 2).to(q.dtype)  # (batch, kv_heads, window, d)
    v = v.transpose(1, 2).to(q.dtype)
    mask = mask.unsqueeze(1).expand(batch, heads // kv_heads, new, -1)
    out = prefix_attention(
        q.reshape(batch, kv_heads, rows, d), k, v, mask.reshape(batch, 1, rows, -1)
    )
    return out.reshape(batch, heads, new, d)


def gathered_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """:func:`window_attention` over the cache slots ``index`` (batch, window) of
    ``keys``/``values`` (slots, kv_heads, d)."""
    return window_attention(q, keys[index], values[index], mask)


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
        """``q`` (1, heads, tokens, d) -> (batch, heads, d) for the decode rows. Padding reads
        slot 0 and is masked out."""
        span = torch.arange(self.longest, device=q.device)
        mask = span < self.lengths.unsqueeze(1)
        index = slots[(self.starts.unsqueeze(1) + span).clamp(max=slots.numel() - 1)]
        index = index.masked_fill(~mask, 0)
        q = q[0, :, self.rows].transpose(0, 1).unsqueeze(2)  # (batch, heads, 1, d)
        return gathered_attention(q, keys, values, index, mask.unsqueeze(1)).squeeze(2)


class BlockTableStep:
    """The cache view (``KVCacheLike``) of a uniform step: each of ``batch`` sequences runs
    exactly ``q_len`` new tokens, sequence b at rows ``b * q_len .. (b + 1) * q_len`` of the
    packed batch, the last of them at position ``context_lens[b] - 1``.

    Every shape depends only on (batch, q_len, window blocks) and nothing is read back to the
    host, so the step can be captured in a CUDA graph and replayed with new device inputs.
    Each sequence attends over a fixed window of ``block_tables.shape[1]`` blocks, gathered
    whole blocks at a time (gathering slot by slot, 128 bytes a row with small-moe, took 6.5
    times as long on an H100); keys past its own are never attended, so table entries past
    its blocks may name any block (a scratch block, say).

    On a GPU in half precision the window goes to FlashAttention-2's variable-length kernel,
    which stops at each sequence's own keys (``seqused_k``) and splits long windows across
    thread blocks: SDPA has no per-sequence key counts, and under a mask its memory-efficient
    kernel walks a sequence's window in one thread block (on an H100 at batch 1 and 2048 keys,
    gathers included, 109 us a layer against 16). Elsewhere SDPA attends under an additive mask.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        q_len: int,
    ) -> None:
        """``slot_mapping`` (batch * q_len,) where the new keys go; ``block_tables`` (batch,
        window blocks); ``context_lens`` (batch,) keys per sequence, the new ones included."""
        self.cache = cache
        self.seq_len = 0  # positions are always given explicitly
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.q_len = q_len
        self.window = block_tables.shape[1] * cache.block_size
        device = block_tables.device
        # Computed once per forward, shared by every layer.
        self.flash = flash_applies(cache)
        if self.flash:
            self.key_counts = context_lens.to(torch.int32)
            starts = torch.arange(block_tables.shape[0] + 1, dtype=torch.int32, device=device)
            self.cu_q, self.cu_k = starts * q_len, starts * self.window
            return
        key_pos = torch.arange(self.window, device=device)
        newest = context_lens.unsqueeze(1) - q_len + torch.arange(q_len, device=device)
        visible = key_pos <= newest.unsqueeze(2)  # (batch, q_len, window): causal in the step
        # Additive, so SDPA doesn't convert a boolean mask again in every layer.
        self.bias = torch.zeros(visible.shape, dtype=cache.k.dtype, device=device)
        self.bias.masked_fill_(~visible, float("-inf"))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` (1, heads, batch * q_len, d) and ``k``/``v`` (1, kv_heads, batch * q_len, d):
        store the new keys/values, then attend."""
        keys, values = self.cache.store(layer, self.slot_mapping, k, v)
        heads, tokens, d = q.shape[1:]
        if self.flash:  # token-major in and out, as the projections lay heads out
            blocks = (-1, self.cache.block_size, *keys.shape[1:])
            out = block_table_flash_attention(
                q[0].transpose(0, 1),
                keys.view(blocks),
                values.view(blocks),
                self.block_tables,
                self.key_counts,
                self.cu_q,
                self.cu_k,
                self.q_len,
            )
            return out.unsqueeze(0).transpose(1, 2)
        batch = self.block_tables.shape[0]
        # (batch, window, kv_heads, d): whole blocks, in table order.
        window = (batch, self.window, *keys.shape[1:])
        k = keys.unflatten(0, (-1, self.cache.block_size))[self.block_tables].view(window)
        v = values.unflatten(0, (-1, self.cache.block_size))[self.block_tables].view(window)
        q = q[0].view(heads, -1, self.q_len, d).transpose(0, 1)  # (batch, heads, q_len, d)
        out = window_attention(q, k, v, self.bias.to(q.dtype))
        # Token-major, as the projections lay heads out: the caller's merge of the heads is then
        # a view, and with q_len 1 so is this.
        return out.transpose(1, 2).reshape(1, tokens, heads, d).transpose(1, 2)

    def advance(self, new_tokens: int) -> None:
        """Positions and lengths live in the caller's sequences, not here."""


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
        keys, values = self.cache.store(layer, self.new_slots, k, v)
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


class VarlenStep:
    """What the model sees as its cache for one packed forward on a GPU in half precision
    (``KVCacheLike``): every sequence of the step, prompt chunks and decodes alike, attends in
    one FlashAttention-2 call per layer over its gathered slots.

    A step of 256 prompts would otherwise launch 256 attention calls per layer (the
    per-sequence path), which leaves the GPU waiting on the host while prompts fill the batch.
    Not batch-invariant: a sequence's numbers may depend on how the kernel splits the batch.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        slots: torch.Tensor,
        new_slots: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
    ) -> None:
        """``slots``: every sequence's ``past + new`` cache slots in packing order;
        ``new_slots``: where the new keys go; ``cu_q``/``cu_k`` (sequences + 1,) int32 offsets
        of each sequence's rows in the packed batch and in ``slots``."""
        self.cache = cache
        self.seq_len = 0  # positions are always given explicitly
        self.slots = slots
        self.new_slots = new_slots
        self.cu_q, self.cu_k = cu_q, cu_k
        self.max_q, self.max_k = max_q, max_k

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` (1, heads, tokens, d) and ``k``/``v`` (1, kv_heads, tokens, d) of the packed
        batch: store the new keys/values, then attend."""
        keys, values = self.cache.store(layer, self.new_slots, k, v)
        out = flash_varlen(
            q[0].transpose(0, 1),
            keys[self.slots].to(q.dtype),
            values[self.slots].to(q.dtype),
            self.cu_q,
            self.cu_k,
            self.max_q,
            self.max_k,
        )
        return out.transpose(0, 1).unsqueeze(0)

    def advance(self, new_tokens: int) -> None:
        """Positions and lengths live in the scheduler's sequences, not here."""
