"""Tensor-parallel serving: one process per device under torchrun, the model split with the
training code's tensor-parallel plan.

Rank 0 runs the whole engine (scheduler, block manager, runner state, sampler); every forward
it broadcasts the step's :class:`ModelInput` (the scheduler's step resolved to token ids,
positions and block tables, flattened to one integer tensor: no Python objects cross ranks)
to the other ranks, and all ranks run the same forward, whose collectives join their shards.
The followers keep their own paged cache of their K/V heads (all of them, with multi-query
attention) at the slots rank 0 assigns, and never look at the logits. ``close()`` on rank 0
releases them.

Failures: a step that fails on rank 0 (a peer died mid-collective, say) leaves the ranks out of
step, so rank 0 sends nothing more, not even the release; torchrun stops every rank once one has
failed. An idle server's rank 0 sends a keep-alive every ``KEEPALIVE_S``, so a follower's wait
for the next step never runs into the collective timeout.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from moegpt.config import ConfigError, ParallelConfig, check_parallel
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.model.moe import GroupedExperts
from moegpt.parallel.experts import shard_experts
from moegpt.parallel.mesh import (
    ParallelDims,
    init_distributed,
    launched_by_torchrun,
)
from moegpt.parallel.tensor import apply_tensor_parallel
from moegpt.serve.graphs import DecodeGraphs
from moegpt.serve.runner import ModelForward, ModelInput, TokenPatch

_STOP = -1  # a length that tells followers to leave their loop
_KEEPALIVE = 0  # a length that tells followers there is no step yet (a packed input is longer)
KEEPALIVE_S = 1.0  # far below any sensible collective timeout, and one tiny broadcast a second


def pack(inp: ModelInput) -> torch.Tensor:
    """``inp`` as one int64 tensor: four counts, then each field."""
    flat = [len(inp.tokens), len(inp.sequences), len(inp.copies), len(inp.logits_rows)]
    flat += inp.tokens + inp.positions
    for offset, new, past, blocks in inp.sequences:
        flat += [offset, new, past, len(blocks), *blocks]
    for source, dest in inp.copies:
        flat += [source, dest]
    flat += inp.logits_rows
    return torch.tensor(flat, dtype=torch.int64)


def unpack(packed: torch.Tensor) -> ModelInput:
    flat = packed.tolist()
    n_tokens, n_seqs, n_copies, n_rows = flat[:4]
    at = 4
    tokens, positions = flat[at : at + n_tokens], flat[at + n_tokens : at + 2 * n_tokens]
    at += 2 * n_tokens
    sequences = []
    for _ in range(n_seqs):
        offset, new, past, n_blocks = flat[at : at + 4]
        sequences.append((offset, new, past, flat[at + 4 : at + 4 + n_blocks]))
        at += 4 + n_blocks
    copies = [(flat[at + 2 * i], flat[at + 2 * i + 1]) for i in range(n_copies)]
    at += 2 * n_copies
    return ModelInput(tokens, positions, sequences, copies, flat[at : at + n_rows])


class TensorParallelForward:
    """Rank 0's forward: sends each input to the followers, then runs its own shard."""

    def __init__(self, forward: ModelForward, group: dist.ProcessGroup) -> None:
        self.forward = forward
        self.cache = forward.cache
        self.group = group
        self._closed = False
        self._sent = time.monotonic()  # when the followers last heard from this rank
        self.failed: BaseException | None = None  # what broke the group, once something has

    def _broadcast_length(self, length: int) -> None:
        self._sent = time.monotonic()
        tensor = torch.tensor([length], dtype=torch.int64, device=self.forward.device)
        dist.broadcast(tensor, group_src=0, group=self.group)

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self.forward.graphs

    def __call__(self, inp: ModelInput, patch: TokenPatch | None = None) -> torch.Tensor:
        # Followers get token ids from the host: a step may not feed tokens on the device.
        assert patch is None, "tensor-parallel steps take their tokens from the host"
        if self.failed is not None:
            raise RuntimeError("tensor-parallel ranks out of step: a step failed") from self.failed
        packed = pack(inp)
        try:
            self._broadcast_length(packed.numel())
            dist.broadcast(packed.to(self.forward.device), group_src=0, group=self.group)
            return self.forward(inp)
        except BaseException as e:
            self.failed = e
            raise

    def keep_alive(self) -> None:
        """Call between steps while idle: tells the followers this rank is alive, at most every
        ``KEEPALIVE_S``. A failure is kept for the next step to raise."""
        if self.failed is None and time.monotonic() - self._sent >= KEEPALIVE_S:
            try:
                self._broadcast_length(_KEEPALIVE)
            except Exception as e:
                self.failed = e

    def close(self) -> None:
        """Release the followers (once), unless the group failed: they may be mid-step, and
        torchrun stops them when this rank exits."""
        if not self._closed and self.failed is None:
            self._closed = True
            self._broadcast_length(_STOP)
            dist.barrier(group=self.group)  # nobody tears the group down while a peer reads
        self.forward.close()


def follow(forward: ModelForward, group: dist.ProcessGroup) -> int:
    """A follower's loop: run every step rank 0 sends until it closes; returns the steps run."""
    device = forward.device
    steps = 0
    while True:
        received = torch.empty(1, dtype=torch.int64, device=device)
        dist.broadcast(received, group_src=0, group=group)
        length = int(received)
        if length == _STOP:
            dist.barrier(group=group)
            return steps
        if length == _KEEPALIVE:
            continue
        packed = torch.empty(length, dtype=torch.int64, device=device)
        dist.broadcast(packed, group_src=0, group=group)
        forward(unpack(packed.cpu()))
        steps += 1


def load_sharded(
    path: str | Path, tp: int, device: torch.device, timeout_s: float
) -> tuple[Transformer, dist.ProcessGroup]:
    """This rank's shard of the exported model at ``path``. The model is built on the meta
    device and split with the training code's plan; then each rank reads from the file only
    the slices it holds (replicated tensors whole) straight onto ``device``, so no rank reads,
    or holds in host memory, a whole sharded tensor."""
    from moegpt.serve.sharded_load import fill_shards
    from moegpt.weights import check_folder

    if not launched_by_torchrun():
        raise UserError(f"serve.tp: {tp} ranks need torchrun (moegpt generate --tp starts it)")
    init_distributed(device, timeout_s)
    folder = check_folder(path)
    layout = ParallelConfig(tp=tp)
    try:
        check_parallel(folder.config, layout)
    except ConfigError as e:
        raise UserError(str(e).replace("parallel.tp", "serve.tp")) from None
    dims = ParallelDims.build(layout, device)
    with torch.device("meta"):
        model = Transformer(folder.config)
    apply_tensor_parallel(model, dims["tp"])
    for experts in [m for m in model.modules() if isinstance(m, GroupedExperts)]:
        shard_experts(experts, dims)
    group = dims["tp"].get_group()
    fill_shards(model, folder, device, group)
    return model.eval(), group
