"""Expert parallelism when a rank's experts get no slots at all (a collapsed router): on gloo
CPU ranks the idle rank still joins both exchanges, forward and backward, and outputs and
expert gradients equal one process's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moegpt.config import ParallelConfig
from moegpt.model.moe import GroupedExperts
from moegpt.parallel.experts import shard_experts
from moegpt.parallel.mesh import ParallelDims
from tests.conftest import small_config
from tests.parallel.test_context import free_port

RANKS, EXPERTS, D = 2, 4, 32


def rank_slots(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s slots, sorted by expert, all for experts 0 and 1 (rank 0's under EP2)."""
    generator = torch.Generator().manual_seed(rank)
    counts = torch.tensor([3 + rank, 2, 0, 0])
    return torch.randn(int(counts.sum()), D, generator=generator), counts


def _rank(rank: int, port: int, grouped: bool, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    torch.manual_seed(0)
    experts = GroupedExperts(small_config(n_experts=EXPERTS, d_model=D))
    experts.use_grouped_mm = grouped
    shard_experts(
        experts, ParallelDims.build(ParallelConfig(dp_shard=RANKS, ep=RANKS), torch.device("cpu"))
    )
    x, counts = rank_slots(rank)
    x.requires_grad_(True)
    y = experts(x, counts)
    y.square().sum().backward()
    grads = {n: w.grad.full_tensor() for n, w in experts.weights().items()}
    torch.save({"y": y.detach(), "dx": x.grad, "grads": grads}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("grouped", [False, True], ids=["loop", "grouped-mm"])
def test_an_idle_expert_rank_matches_one_process(grouped: bool, tmp_path: Path) -> None:
    mp.spawn(_rank, args=(free_port(), grouped, tmp_path), nprocs=RANKS, join=True)
    torch.manual_seed(0)
    single = GroupedExperts(small_config(n_experts=EXPERTS, d_model=D))
    single.use_grouped_mm = grouped
    for rank in range(RANKS):
        x, counts = rank_slots(rank)
        x.requires_grad_(True)
        y = single(x, counts)
        y.square().sum().backward()
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["y"], y.detach())
        torch.testing.assert_close(got["dx"], x.grad)
    for name, weight in single.weights().items():  # summed over both ranks' slots
        torch.testing.assert_close(got["grads"][name], weight.grad)
        assert torch.count_nonzero(weight.grad[2:]) == 0  # rank 1's experts: no slots
