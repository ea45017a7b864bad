"""The symmetric-memory all-reduce of tensor-parallel serving picks its kernel from shapes alone
(so every rank, and a compiled graph, takes the same branch), and stays off where symmetric
memory cannot run: its GPU kernels are measured against NCCL in benchmarks/tp_all_reduce.py."""

from __future__ import annotations

import torch

from moegpt.parallel import symmetric


def test_sums_route_by_size_and_alignment(monkeypatch) -> None:
    monkeypatch.setitem(symmetric._buffers, ("g", torch.bfloat16), torch.empty(0))
    route = symmetric._route

    def rows(n: int, width: int = 2048, dtype=torch.bfloat16) -> torch.Tensor:
        return torch.empty(n, width, dtype=dtype, device="meta")

    assert route(rows(1), "g", 2) == "one_shot"  # a decode step's 4 KiB
    assert route(rows(32), "g", 2) == "one_shot"  # 128 KiB: the one-shot limit
    assert route(rows(33), "g", 2) == "two_shot"
    assert route(rows(2048), "g", 4) == "two_shot"  # 8 MiB
    assert route(rows(4096), "g", 2) == "two_shot"  # 16 MiB: the buffer's size
    assert route(rows(4097), "g", 2) == "nccl"
    assert route(rows(3, width=3), "g", 2) == "nccl"  # 18 bytes: not 16-byte vectors
    # two-shot only where each of 8 ranks' chunks is whole 16-byte vectors (conservative)
    assert route(rows(1, width=65544), "g", 8) == "nccl"
    assert route(rows(0), "g", 2) == "nccl"
    assert route(rows(1, dtype=torch.float32), "g", 2) == "nccl"  # no float32 buffer
    assert route(rows(1), "other group", 2) == "nccl"


def test_symmetric_memory_stays_off_on_cpu_ranks() -> None:
    import torch.distributed as dist

    from tests.parallel.test_context import free_port

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        group = dist.group.WORLD
        assert not symmetric.enable(group, torch.device("cpu"), torch.bfloat16)
        x = torch.arange(6.0).reshape(2, 3)
        summed = symmetric.all_reduce_sum(x, group)  # gloo's all-reduce, one rank
        assert torch.equal(torch.as_tensor(summed), x)
    finally:
        dist.destroy_process_group()
