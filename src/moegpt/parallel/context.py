"""Context parallelism: the ``cp`` ranks of a mesh each hold part of every sequence of a
micro-batch, and attention runs as ring attention over them (PyTorch's
``torch.distributed.tensor.experimental.context_parallel``, which swaps the SDPA call for a
ring over the CUDA flash, memory-efficient or cuDNN kernels while the context is open).

Each rank takes one chunk from the head of the sequence and one from its tail (the head-tail
load balancer), so under causal attention every rank does the same work. The batch's
inputs, labels and positions are split the same way, so the loss each rank computes over its
tokens, summed over the ranks, is the whole sequence's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.device_mesh import DeviceMesh

from moegpt.errors import UserError

# The batch tensors that run along the sequence: (batch, seq) each.
SEQUENCE_KEYS = ("input_ids", "labels", "positions", "padding")


def check_device(cp: int, device: torch.device) -> None:
    """Ring attention is built on CUDA attention kernels; PyTorch has no CPU one."""
    if cp > 1 and device.type != "cuda":
        raise UserError(
            f"parallel.cp: context parallelism ({cp} ranks) runs ring attention on CUDA "
            f"attention kernels; this job runs on {device.type}"
        )


@contextlib.contextmanager
def sequence_shards(mesh: DeviceMesh | None, batch: dict[str, torch.Tensor]) -> Iterator[None]:
    """While open, ``batch``'s sequence tensors hold this rank's chunks (resized in place;
    positions are added where the batch has none) and SDPA is ring attention over ``mesh``;
    run forward and backward inside. ``mesh`` None or of one rank: nothing changes."""
    if mesh is None or mesh.size() == 1:
        yield
        return
    from torch.distributed.tensor.experimental import context_parallel

    if "positions" not in batch:
        # The model counts positions from 0 over what it is given: each rank's chunks need
        # their places in the whole sequence, split with the tokens.
        rows, seq = batch["input_ids"].shape
        device = batch["input_ids"].device
        batch["positions"] = torch.arange(seq, device=device).repeat(rows, 1)
    buffers = [batch[k] for k in SEQUENCE_KEYS if k in batch]
    # The full tensors are not needed afterwards: skip restoring them.
    with context_parallel(
        mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers)
    ):
        yield
