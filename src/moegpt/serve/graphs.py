"""CUDA graphs for uniform decode steps: the model's forward replayed without launching it.

At small batches a decode step is bound by the host launching a few hundred small kernels, not
by the GPU. A :class:`moegpt.serve.paged.BlockTableStep` forward has fixed shapes for a given
(padded batch, q_len, key-window blocks) bucket and never reads back to the host, so each bucket
is captured once and replayed with new inputs written into the same device buffers.

A step's inputs travel in one host-to-device copy: they are packed into one pinned host buffer
in the layout of the bucket's views of one device buffer. Batches are padded up to the bucket's
size with rows that write to the cache's scratch block and attend only to themselves there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch._dynamo import config as dynamo_config
from torch.fx.experimental import _config as fx_config
from torch.nn.attention import sdpa_kernel

from moegpt.model import Transformer
from moegpt.model.attention import KVCacheLike
from moegpt.model.moe import GroupedExperts, MoEStats
from moegpt.model.transformer import TransformerBlock
from moegpt.serve.paged import SDPA_BACKENDS, BlockTableStep, PagedKVCache


def batch_ladder(max_batch_size: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, steps of 8 to 32, steps of 16 beyond (as vLLM pads),
    ending at ``max_batch_size``."""
    sizes = [1, 2, 4, *range(8, 32, 8), *range(32, max_batch_size, 16)]
    return [s for s in sizes if s < max_batch_size] + [max_batch_size]


def window_ladder(max_blocks: int) -> list[int]:
    """Key windows in blocks: powers of two from 2, ending at ``max_blocks``, so a batch of
    short sequences does not read (and mask) keys up to the longest context. No window of one
    block: a compiled step would specialise on that size 1 and compile again for it."""
    sizes = [2**i for i in range(1, max_blocks.bit_length()) if 2**i < max_blocks]
    return [*sizes, max_blocks]


def host_sync_reason(model: Transformer, device: torch.device) -> str | None:
    """Why ``model``'s forward would read back to the host on ``device`` (None if it won't).

    Only the MoE experts' per-expert loop does (its split sizes): it runs wherever the grouped
    GEMM doesn't, i.e. off bf16. A sync-free alternative for other dtypes would gather every
    token's top-k expert weights (weight traffic growing with the batch instead of with the
    experts touched) or run every expert on every token; neither is worth carrying for
    serving in fp32 on a GPU, which runs eagerly instead.
    """
    dtype = next(model.parameters()).dtype
    for name, module in model.named_modules():
        if isinstance(module, GroupedExperts) and not module.wants_grouped_mm(
            device, dtype, module.w1
        ):
            return f"{name} runs its experts as a loop with a host sync in {dtype} (bf16 doesn't)"
    return None


@dataclass
class StepInputs:
    """One bucket's views of a flat int64 buffer, in packing order."""

    tokens: torch.Tensor  # (batch * q_len,)
    positions: torch.Tensor  # (batch * q_len,)
    slot_mapping: torch.Tensor  # (batch * q_len,)
    context_lens: torch.Tensor  # (batch,)
    block_tables: torch.Tensor  # (batch, blocks)

    @classmethod
    def view(cls, flat: torch.Tensor, batch: int, q_len: int, blocks: int) -> StepInputs:
        rows = batch * q_len
        sizes = [rows, rows, rows, batch, batch * blocks]
        *rows_and_lens, tables = flat[: sum(sizes)].split(sizes)
        return cls(*rows_and_lens, tables.view(batch, blocks))


Bucket = tuple[int, int, int]  # (padded batch, q_len, window blocks)


class DecodeGraphs:
    """Uniform steps of up to ``max_batch_size`` sequences of up to ``max_context`` tokens,
    ``q_lens`` new tokens each (1 to decode, 1 + k to verify k speculative tokens), run through
    one CUDA graph per bucket once :meth:`capture` succeeds, else eagerly over the same buffers
    (always on CPU). ``cache`` needs a scratch block (``PagedKVCache(..., spare_block=True)``).
    """

    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        max_batch_size: int,
        max_context: int,
        q_lens: tuple[int, ...] = (1,),
        compile: bool = False,
    ) -> None:
        if cache.scratch_block is None:
            raise ValueError("DecodeGraphs needs a cache with a spare block for padding rows")
        if max(q_lens) > cache.block_size:  # padding rows' q_len keys fit in the scratch block
            raise ValueError(f"q_len {max(q_lens)} exceeds the block size {cache.block_size}")
        self.model = model
        self.cache = cache
        self.device = cache.k.device
        self.q_lens = q_lens
        self.max_blocks = math.ceil(max_context / cache.block_size)
        self.batch_sizes = batch_ladder(max_batch_size)
        self.window_sizes = window_ladder(self.max_blocks)
        # A bucket's inputs, then the rows a token patch overwrites (at most one a row).
        biggest = max_batch_size * (4 * max(q_lens) + 1 + self.max_blocks)
        self._inputs = torch.zeros(biggest, dtype=torch.long, device=self.device)
        cuda = self.device.type == "cuda"
        self._staging = torch.zeros(biggest, dtype=torch.long, pin_memory=cuda)
        self._staging_np = self._staging.numpy()
        # The copy out of staging is asynchronous: the next step waits for it before refilling.
        self._copied = torch.cuda.Event() if cuda else None
        rows = max_batch_size * max(q_lens)
        dtype = next(model.parameters()).dtype
        # One logits buffer for every bucket, outside the graphs' pool: per-graph outputs would
        # keep (batch x vocab) alive for each of the buckets.
        self._logits = torch.empty(rows, model.config.vocab_size, dtype=dtype, device=self.device)
        self._graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        # Compiled, the step's elementwise work (norms, rotary embeddings, routing, residuals)
        # fuses into a fraction of its eager kernels, which is what a replayed step at a small
        # batch spends its time on. Compiled by block (regional compilation): every layer runs
        # the same code, so one compilation serves them all, and start-up does not grow with
        # depth (the whole forward compiled took 40 s for small-moe's 12 layers on an H100, 81 s
        # for medium-moe's 24, for each of three specialisations). Dynamic shapes: one
        # compilation serves every bucket but the few that size-1 dimensions and the MoE
        # layer's shape-dependent path specialise.
        self.compiled = compile
        self._call_block = torch.compile(call_block, **COMPILE_OPTIONS) if compile else None

    def release(self) -> None:
        """Destroy the captured graphs now, not when this object is collected: NCCL's teardown
        waits for graphs that captured its collectives (a tensor-parallel run hung at exit in
        ``destroy_process_group`` while a reference cycle kept them alive)."""
        for graph in self._graphs.values():
            graph.reset()
        self._graphs.clear()

    @property
    def captured(self) -> int:
        """Buckets captured as graphs (0 before :meth:`capture`, and on CPU)."""
        return len(self._graphs)

    def bucket(self, batch: int, q_len: int, context: int) -> Bucket:
        """The smallest bucket that holds ``batch`` sequences of at most ``context`` tokens."""
        if not self.fits(batch, q_len, context):
            raise ValueError(f"no bucket for {batch} sequences of {q_len} new / {context} tokens")
        blocks = math.ceil(context / self.cache.block_size)
        padded = next(size for size in self.batch_sizes if size >= batch)
        return padded, q_len, next(size for size in self.window_sizes if size >= blocks)

    def fits(self, batch: int, q_len: int, context: int) -> bool:
        """Whether a step of ``batch`` sequences, ``q_len`` new tokens each and at most
        ``context`` tokens (the new ones included), has a bucket."""
        return (
            q_len in self.q_lens
            and 0 < batch <= self.batch_sizes[-1]
            and context <= self.max_blocks * self.cache.block_size
        )

    def blocker(self) -> str | None:
        """Why no bucket could be captured here whatever the compilation (None: nothing)."""
        if self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device, not {self.device}"
        return host_sync_reason(self.model, self.device)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so that the smaller ones reuse its memory in the
        shared pool. Raises where the forward can't be captured (the caller runs eagerly).
        Compiled, the first bucket of each specialisation compiles in its warm-up run."""
        reason = self.blocker()
        if reason is not None:
            raise RuntimeError(reason)
        pool = torch.cuda.graph_pool_handle()
        buckets = [
            (batch, q_len, blocks)
            for q_len in self.q_lens
            for batch in self.batch_sizes
            for blocks in self.window_sizes
        ]
        for bucket in sorted(buckets, key=lambda b: (b[0] * b[1], b[2]), reverse=True):
            inputs, _ = self._fill(bucket, [], [], [], np.empty((0, bucket[2])), [])  # padding
            # Lazy initialisation (cuBLAS workspaces, kernel loading) must happen outside the
            # capture, on a side stream as torch.cuda.graphs documents.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(inputs)
            self._graphs[bucket] = graph

    @torch.inference_mode()
    def run(
        self,
        tokens: list[int],
        positions: list[int],
        slot_mapping: np.ndarray,
        block_tables: np.ndarray,
        context_lens: np.ndarray,
        q_len: int,
        token_patch: tuple[list[int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (batch * q_len, vocab) in the model's dtype for the real rows, sequence b at
        rows ``b * q_len ..``; a view of a buffer the next run overwrites. ``token_patch``
        (rows, device tokens) overwrites tokens after the copy to the device.

        ``context_lens`` count each sequence's keys with its new tokens; ``block_tables``
        are (batch, the bucket's window blocks), entries past those keys masked out.
        """
        batch = len(context_lens)
        bucket = self.bucket(batch, q_len, max(context_lens, default=0))
        rows, values = token_patch if token_patch is not None else ([], None)
        inputs, patched = self._fill(
            bucket, tokens, positions, slot_mapping, block_tables, context_lens, rows
        )
        if values is not None:
            inputs.tokens[patched] = values
        graph = self._graphs.get(bucket)
        if graph is None:
            self._forward(inputs)
        else:
            graph.replay()
        return self._logits[: batch * q_len]

    def _fill(
        self,
        bucket: Bucket,
        tokens: list[int],
        positions: list[int],
        slot_mapping: np.ndarray | list[int],
        block_tables: np.ndarray,
        context_lens: np.ndarray | list[int],
        patch_rows: list[int] = (),
    ) -> tuple[StepInputs, torch.Tensor]:
        """Pack a step padded to ``bucket`` into staging, copy it to the device buffer in one
        copy, and return the bucket's views of that buffer, and of ``patch_rows`` there. (An
        index list used on the device directly would be copied to it synchronously, waiting
        for the step still running.)

        Padding rows are token 0 at position 0 writing the scratch block's first ``q_len``
        slots, with a context of ``q_len`` keys there: they attend to themselves only, so they
        stay finite and never read a sequence's blocks.
        """
        batch, q_len, blocks = bucket
        real, rows = len(tokens), batch * q_len
        if self._copied is not None:
            self._copied.synchronize()
        # Written in place through numpy: at 256 sequences of 2048 tokens, building one list
        # of the padded tables took milliseconds of host time a step.
        staged = self._staging_np
        columns = [tokens, positions, slot_mapping]
        scratch = self.cache.scratch_block
        pads = [0, 0, scratch * self.cache.block_size + np.arange(q_len)]
        for start, values, pad in zip(range(0, 3 * rows, rows), columns, pads, strict=True):
            staged[start : start + real] = values
            staged[start + real : start + rows].reshape(-1, q_len)[:] = pad
        lens = staged[3 * rows : 3 * rows + batch]
        lens[: len(context_lens)] = context_lens
        lens[len(context_lens) :] = q_len
        tables = staged[3 * rows + batch : 3 * rows + batch * (1 + blocks)].reshape(batch, blocks)
        tables[: len(block_tables)] = block_tables
        tables[len(block_tables) :] = scratch
        total = 3 * rows + batch * (1 + blocks)
        staged[total : total + len(patch_rows)] = patch_rows
        end = total + len(patch_rows)
        self._inputs[:end].copy_(self._staging[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return StepInputs.view(self._inputs, batch, q_len, blocks), self._inputs[total:end]

    def _forward(self, inputs: StepInputs) -> None:
        """The step's forward over the bucket's buffers, logits into the shared buffer."""
        q_len = inputs.tokens.numel() // inputs.context_lens.numel()
        view = BlockTableStep(
            self.cache, inputs.slot_mapping, inputs.block_tables, inputs.context_lens, q_len
        )
        logits = self.forward(inputs.tokens, inputs.positions, view)
        self._logits[: inputs.tokens.numel()].copy_(logits)

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCacheLike
    ) -> torch.Tensor:
        """The model's logits for one packed sequence of ``tokens`` over ``cache``, its
        blocks through the compiled block when the graphs are compiled: the decode graphs'
        forward, and the eager steps' too (a step with prompt chunks then launches a
        fraction of its kernels: small-moe's cost about 22 ms of host time on an H200
        whatever their size, uncompiled)."""
        # Sizes that merely coincide (a batch of as many sequences as the model has layers)
        # must not become one symbol, or a bucket of another batch would recompile.
        no_duck_shapes = fx_config.patch(use_duck_shape=False)
        with sdpa_kernel(SDPA_BACKENDS), dynamo_config.patch(**DYNAMO_CONFIG), no_duck_shapes:
            out = self.model(
                tokens[None], positions=positions[None], cache=cache, call_block=self._call_block
            )
        return out.logits[0]


def call_block(
    block: TransformerBlock,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: KVCacheLike | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, MoEStats | None]:
    """One transformer block: the region :class:`DecodeGraphs` compiles."""
    return block(h, cos, sin, cache, mask)


COMPILE_OPTIONS: dict = dict(fullgraph=True, dynamic=True)
DYNAMO_CONFIG = dict(
    # A block's layer index (which cache layer it reads) is an input, not a constant, so
    # every layer shares one compilation.
    allow_unspec_int_on_nn_module=True,
    # (batch 1, rows routed in place, more) x (decode, verify, packed eager step) x (dense,
    # MoE blocks), with room.
    recompile_limit=32,
)
