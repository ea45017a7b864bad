"""``parallel.reshard_after_forward``: under FSDP2 a block frees its gathered weights after
its forward (ZeRO-3) unless the setting keeps them for its backward; the last block keeps
them either way, since the backward starts with it. Checked on gloo CPU ranks by what a
block's parameters are between the forward and the backward: sharded DTensors again, or
the whole gathered tensors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from moegpt.config import ParallelConfig
from moegpt.model.transformer import Transformer
from moegpt.parallel.data import apply_fsdp
from moegpt.parallel.mesh import ParallelDims
from tests.conftest import small_config
from tests.parallel.test_context import free_port

RANKS = 2


def _rank(rank: int, port: int, reshard: bool, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    config = ParallelConfig(dp_shard=RANKS, reshard_after_forward=reshard)
    model = Transformer(small_config(n_layers=3))
    apply_fsdp(model, ParallelDims.build(config, torch.device("cpu")), MixedPrecisionPolicy())
    model(torch.randint(0, 97, (2, 16)))
    sharded = [
        all(isinstance(p, DTensor) for p in block.parameters()) for block in model.layers.values()
    ]
    torch.save(sharded, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("reshard", [True, False])
def test_blocks_keep_their_gathered_weights_only_when_asked(reshard: bool, tmp_path: Path) -> None:
    mp.spawn(_rank, args=(free_port(), reshard, tmp_path), nprocs=RANKS, join=True)
    for rank in range(RANKS):
        sharded = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert sharded == [reshard, reshard, False]
