"""Context parallelism's sequence split on gloo CPU ranks: each rank holds one chunk from the
head of every sequence and one from its tail, with the labels and the global positions of its
tokens (ring attention itself runs on CUDA kernels only; benchmarks/multi_gpu.py --phases
context checks it against one GPU)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from moegpt.parallel.context import sequence_shards

ROWS, SEQ, RANKS = 2, 16, 2


def full_batch() -> dict[str, torch.Tensor]:
    """Token ids that name their row and place; labels the next token's id."""
    ids = torch.arange(ROWS * SEQ).reshape(ROWS, SEQ)
    return {"input_ids": ids.clone(), "labels": ids + 1}


def _rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    mesh = init_device_mesh("cpu", (RANKS,), mesh_dim_names=("cp",))
    batch = full_batch()  # no positions: the split must add them
    with sequence_shards(mesh, batch):
        torch.save({k: v.clone() for k, v in batch.items()}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_rank_holds_a_head_and_a_tail_chunk_with_their_positions(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(free_port(), tmp_path), nprocs=RANKS, join=True)
    full = full_batch()
    chunk = SEQ // (2 * RANKS)
    seen = []
    for rank in range(RANKS):
        part = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        positions = part["positions"]
        head = list(range(rank * chunk, (rank + 1) * chunk))
        tail = list(range(SEQ - (rank + 1) * chunk, SEQ - rank * chunk))
        assert positions.tolist() == [head + tail] * ROWS
        for key in ("input_ids", "labels"):
            assert torch.equal(part[key], full[key].gather(1, positions))
        seen += positions[0].tolist()
    assert sorted(seen) == list(range(SEQ))  # every token on exactly one rank


def test_one_rank_or_none_changes_nothing() -> None:
    batch = full_batch()
    with sequence_shards(None, batch):
        assert batch.keys() == {"input_ids", "labels"} and batch["input_ids"].shape == (ROWS, SEQ)
