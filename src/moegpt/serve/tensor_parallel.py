"""Tensor-parallel serving: one process per device under torchrun, the model split with the
training code's tensor-parallel plan.

Rank 0 runs the whole engine (scheduler, block manager, runner state, sampler); every forward
it sends the step's :class:`ModelInput` (the scheduler's step resolved to token ids,
positions and block tables, flattened to one integer tensor: no Python objects cross ranks)
to the other ranks, and all ranks run the same forward, whose collectives join their shards.
The followers keep their own paged cache of their K/V heads (all of them, with multi-query
attention) at the slots rank 0 assigns, and never look at the logits. ``close()`` on rank 0
releases them.

Two channels, so that no follower waits on its device between steps (as vLLM's workers take
their inputs from shared memory, not from the GPU): the step's host data goes over a gloo
group, which a follower reads while its device still runs the previous step; the tokens a
step feeds on the device (overlap: the previous step is still drawing them) go over the
device group in stream order, never through a host. So rank 0 overlaps its host work with the
device under tensor parallelism too.

Failures: a step that fails on rank 0 (a peer died mid-collective, say) leaves the ranks out of
step, so rank 0 sends nothing more, not even the release; torchrun stops every rank once one has
failed. An idle server's rank 0 sends a keep-alive every ``KEEPALIVE_S``, so a follower's wait
for the next step never runs into the collective timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from moegpt.config import ConfigError, ParallelConfig, check_parallel
from moegpt.console import stderr
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.parallel import symmetric
from moegpt.parallel.mesh import (
    ParallelDims,
    init_distributed,
    launched_by_torchrun,
)
from moegpt.parallel.serving import shard_for_serving
from moegpt.serve.graphs import DecodeGraphs
from moegpt.serve.runner import ModelForward, ModelInput, TokenPatch

_STOP = -1  # a length that tells followers to leave their loop
_KEEPALIVE = 0  # a length that tells followers there is no step yet (a packed input is longer)
KEEPALIVE_S = 1.0  # far below any sensible collective timeout, and one tiny broadcast a second
# Integers in a step's first message: its length, then the packed input. A decode step of 64
# sequences at a few thousand tokens fits, so it costs one broadcast, not a length and then
# the data (each a round trip between processes, on the step's critical path).
FIRST_MESSAGE = 4096


def pack(inp: ModelInput, patch_rows: list[int] = ()) -> torch.Tensor:
    """``inp`` and the rows a token patch overwrites, as one int64 tensor: six counts, then
    each field."""
    counts = [inp.tokens, inp.sequences, inp.copies, inp.logits_rows, inp.tables, patch_rows]
    flat = [len(field) for field in counts]
    flat += patch_rows
    flat += inp.tokens + inp.positions
    for sequence in inp.sequences:
        flat += sequence
    for source, dest in inp.copies:
        flat += [source, dest]
    flat += inp.logits_rows
    for row, first, blocks in inp.tables:
        flat += [row, first, len(blocks), *blocks]
    return torch.tensor(flat, dtype=torch.int64)


def unpack(packed: torch.Tensor) -> tuple[ModelInput, list[int]]:
    """The step input and the patched rows of :func:`pack`."""
    flat = packed.tolist()
    n_tokens, n_seqs, n_copies, n_rows, n_tables, n_patched = flat[:6]
    at = 6
    patch_rows = flat[at : at + n_patched]
    at += n_patched
    tokens, positions = flat[at : at + n_tokens], flat[at + n_tokens : at + 2 * n_tokens]
    at += 2 * n_tokens
    sequences = [tuple(flat[at + 4 * i : at + 4 * i + 4]) for i in range(n_seqs)]
    at += 4 * n_seqs
    copies = [(flat[at + 2 * i], flat[at + 2 * i + 1]) for i in range(n_copies)]
    at += 2 * n_copies
    logits_rows = flat[at : at + n_rows]
    at += n_rows
    tables = []
    for _ in range(n_tables):
        row, first, n_blocks = flat[at : at + 3]
        tables.append((row, first, tuple(flat[at + 3 : at + 3 + n_blocks])))
        at += 3 + n_blocks
    return ModelInput(tokens, positions, sequences, copies, logits_rows, tables), patch_rows


@dataclass(frozen=True)
class TensorParallelGroups:
    """The same ranks twice: ``device`` (NCCL on GPUs) for the model's collectives and the
    tokens a step feeds on the device, ``host`` (gloo) for the step inputs."""

    device: dist.ProcessGroup
    host: dist.ProcessGroup


class TensorParallelForward:
    """Rank 0's forward: sends each input to the followers, then runs its own shard."""

    def __init__(self, forward: ModelForward, groups: TensorParallelGroups) -> None:
        self.forward = forward
        self.cache = forward.cache
        self.groups = groups
        self._closed = False
        self._sent = time.monotonic()  # when the followers last heard from this rank
        self.failed: BaseException | None = None  # what broke the group, once something has

    def _send(self, length: int, packed: torch.Tensor | None = None) -> None:
        """One message of ``length`` and as much of ``packed`` as fits; the rest after it."""
        self._sent = time.monotonic()
        first = torch.empty(FIRST_MESSAGE, dtype=torch.int64)
        first[0] = length
        if packed is not None:
            first[1 : 1 + min(length, FIRST_MESSAGE - 1)] = packed[: FIRST_MESSAGE - 1]
        dist.broadcast(first, group_src=0, group=self.groups.host)
        if packed is not None and length > FIRST_MESSAGE - 1:
            dist.broadcast(packed[FIRST_MESSAGE - 1 :], group_src=0, group=self.groups.host)

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self.forward.graphs

    def __call__(
        self, inp: ModelInput, patch: TokenPatch | None = None, media: None = None
    ) -> torch.Tensor:
        if media is not None:  # vision folders are refused under TP (load_sharded)
            raise ValueError("tensor-parallel serving has no images")
        if self.failed is not None:
            raise RuntimeError("tensor-parallel ranks out of step: a step failed") from self.failed
        packed = pack(inp, patch[0] if patch is not None else [])
        try:
            self._send(packed.numel(), packed)
            if patch is not None:  # in stream order: the draw producing them may still run
                values = patch[1].to(torch.int64).contiguous()
                dist.broadcast(values, group_src=0, group=self.groups.device)
            return self.forward(inp, patch)
        except BaseException as e:
            self.failed = e
            raise

    def keep_alive(self) -> None:
        """Call between steps while idle: tells the followers this rank is alive, at most every
        ``KEEPALIVE_S``. A failure is kept for the next step to raise."""
        if self.failed is None and time.monotonic() - self._sent >= KEEPALIVE_S:
            try:
                self._send(_KEEPALIVE)
            except Exception as e:
                self.failed = e

    def close(self) -> None:
        """Release the followers (once), unless the group failed: they may be mid-step, and
        torchrun stops them when this rank exits."""
        if not self._closed and self.failed is None:
            self._closed = True
            self._send(_STOP)
            dist.barrier(group=self.groups.host)  # nobody tears the groups down mid-read
        self.forward.close()


def follow(forward: ModelForward, groups: TensorParallelGroups) -> int:
    """A follower's loop: run every step rank 0 sends until it closes; returns the steps run.
    It waits on the host channel only, so it queues step n + 1 while its device runs step n."""
    steps = 0
    while True:
        first = torch.empty(FIRST_MESSAGE, dtype=torch.int64)
        dist.broadcast(first, group_src=0, group=groups.host)
        length = int(first[0])
        if length == _STOP:
            dist.barrier(group=groups.host)
            return steps
        if length == _KEEPALIVE:
            continue
        packed = first[1 : 1 + length]
        if length > FIRST_MESSAGE - 1:
            rest = torch.empty(length - (FIRST_MESSAGE - 1), dtype=torch.int64)
            dist.broadcast(rest, group_src=0, group=groups.host)
            packed = torch.cat([packed, rest])
        inp, patch_rows = unpack(packed)
        patch = None
        if patch_rows:
            values = torch.empty(len(patch_rows), dtype=torch.int64, device=forward.device)
            dist.broadcast(values, group_src=0, group=groups.device)
            patch = (patch_rows, values)
        forward(inp, patch)
        steps += 1


def load_sharded(
    path: str | Path,
    tp: int,
    device: torch.device,
    timeout_s: float,
    verify: bool = True,
    custom_all_reduce: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[Transformer, TensorParallelGroups]:
    """This rank's shard of the exported model at ``path``. The model is built on the meta
    device and split with the training code's plan, on plain tensors
    (:func:`moegpt.parallel.serving.shard_for_serving`); then each rank reads from the file
    only the slices it holds (replicated tensors whole) straight onto ``device``, so no rank
    reads, or holds in host memory, a whole sharded tensor. ``custom_all_reduce``: sum small
    activations through symmetric memory where the GPUs allow (:mod:`moegpt.parallel.symmetric`);
    ``dtype``: the weights' (None: the folder's own)."""
    from moegpt.serve.sharded_load import fill_shards
    from moegpt.weights import check_folder, refuse_vision

    if not launched_by_torchrun():
        raise UserError(f"serve.tp: {tp} ranks need torchrun (moegpt generate --tp starts it)")
    init_distributed(device, timeout_s)
    folder = check_folder(path, dtype, verify and dist.get_rank() == 0)  # one rank reads it all
    refuse_vision(folder, "tensor-parallel serving")
    layout = ParallelConfig(tp=tp)
    try:
        check_parallel(folder.config, layout)
    except ConfigError as e:
        raise UserError(str(e).replace("parallel.tp", "serve.tp")) from None
    group = ParallelDims.build(layout, device)["tp"].get_group()
    with torch.device("meta"):
        model = Transformer(folder.config)
    blocks = shard_for_serving(model, group)
    started = time.perf_counter()
    read = fill_shards(model, folder, device, blocks, group)
    if dist.get_rank() == 0:  # a large model's load takes minutes: say what it took
        gigabytes = read.elements * folder.dtype.itemsize / 1e9
        stderr.print(
            f"serve: rank 0 read its TP{tp} shard ({gigabytes:.1f} GB) in "
            f"{time.perf_counter() - started:.1f} s",
            highlight=False,
        )
    if custom_all_reduce:
        symmetric.enable(group, device, folder.dtype)
    host = dist.new_group(
        dist.get_process_group_ranks(group), timeout=timedelta(seconds=timeout_s), backend="gloo"
    )
    return model.eval(), TensorParallelGroups(group, host)
