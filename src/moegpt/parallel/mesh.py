"""The process group and device mesh of a parallel run.

The mesh has six named dimensions, outermost first: ``pp``, ``dp_replicate``,
``dp_shard_mod_ep``, ``ep``, ``cp``, ``tp`` (size-1 dimensions included, so every layout has
the same names). Expert parallelism borrows ranks from the parameter-sharding data dimension:
``dp_shard = dp_shard_mod_ep x ep``. Context-parallel ranks read the same sequences, each
attending over its part of them, and FSDP shards parameters over them too (torchtitan's
``dp_shard_cp``). Tensor parallelism is innermost, so on a GPU cluster its ranks share a
node's NVLink. Flattened views: ``dp_shard``, ``dp`` (every rank that reads different data)
and ``dp_shard_cp``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moegpt.config import ParallelConfig
from moegpt.errors import UserError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: torch.device, timeout_s: float) -> None:
    """Join the job torchrun started: NCCL on GPUs, gloo on CPU. ``timeout_s`` bounds every
    collective, so a job whose peer died fails instead of hanging."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=timeout_s),
    )


def local_device() -> torch.device:
    """This rank's device: its GPU (LOCAL_RANK) when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass
class ParallelDims:
    """A layout on a live mesh: sizes, this rank's coordinates and the sub-meshes."""

    config: ParallelConfig
    mesh: DeviceMesh

    @classmethod
    def build(cls, config: ParallelConfig, device: torch.device) -> ParallelDims:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != config.world_size:
            raise UserError(
                f"parallel: the layout needs dp_replicate x dp_shard x cp x tp x pp = "
                f"{config.world_size} ranks, but the job has {world}"
            )
        c = config
        shape = (c.pp, c.dp_replicate, c.dp_shard // c.ep, c.ep, c.cp, c.tp)
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
        mesh["dp_shard_mod_ep", "ep"]._flatten("dp_shard")
        mesh["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")
        mesh["dp_shard_mod_ep", "ep", "cp"]._flatten("dp_shard_cp")
        return cls(config, mesh)

    def __getitem__(self, names: str | tuple[str, ...]) -> DeviceMesh:
        return self.mesh[names]

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.config.dp

    @property
    def pp_rank(self) -> int:
        return self.mesh["pp"].get_local_rank()

    def describe(self) -> str:
        """One line: the layout and its mesh, for the log."""
        c = self.config
        parts = [f"pp {c.pp}", f"dp_replicate {c.dp_replicate}", f"dp_shard {c.dp_shard}"]
        parts += [f"ep {c.ep}", f"cp {c.cp}", f"tp {c.tp}"]
        extras = []
        if c.zero1:
            extras.append("ZeRO-1")
        if c.pp > 1:
            extras.append(f"{c.pp_schedule} x {c.pp_microbatches} micro-batches")
        mesh = " x ".join(parts)
        return f"mesh {mesh} ({c.world_size} ranks)" + (f"; {', '.join(extras)}" if extras else "")
