"""Data parallelism: FSDP2 (``dp_shard``, with ``dp_replicate`` as HSDP) or ZeRO-1 (DDP with
the optimizer states sharded by ``ZeroRedundancyOptimizer``).

Gradients are summed, never averaged, over data-parallel ranks: the trainer divides the loss
by the label tokens of the whole global batch, so a sum is the single-process gradient
whatever the ranks' shares of padding.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from moegpt.model.moe import GroupedExperts
from moegpt.model.transformer import Transformer
from moegpt.parallel.mesh import ParallelDims


def dp_mesh(dims: ParallelDims, shard: str) -> Any:
    """The mesh FSDP shards over ``shard``, as HSDP when there are replicas too."""
    if dims.config.dp_replicate > 1:
        return dims["dp_replicate", shard]
    return dims[shard]


def apply_fsdp(model: Transformer, dims: ParallelDims, mp_policy: MixedPrecisionPolicy) -> None:
    """``fully_shard`` each block, then the rest (embedding, norm, head) as the root.

    Expert weights already split by expert parallelism are sharded further only over the
    data-parallel ranks outside their EP group (``dp_shard_mod_ep``, plus replicas); when
    there are none, FSDP leaves them alone: the all-to-all already summed their gradients.
    """
    c = dims.config
    # Context-parallel ranks hold the same parameters and sum their gradients: FSDP shards
    # over them as over data-parallel ranks (EP and CP don't combine, so experts keep theirs).
    mesh = dp_mesh(dims, "dp_shard_cp" if c.cp > 1 else "dp_shard")
    blocks = list(model.layers.values())
    for block in blocks:
        # The backward starts with the last block: freeing its gathered weights after the
        # forward would only gather them again at once (torchtitan keeps them too). With
        # parallel.reshard_after_forward = false every block keeps its own.
        keep = block is blocks[-1] or not c.reshard_after_forward
        ignored = None
        if c.ep > 1:
            for experts in (m for m in block.modules() if isinstance(m, GroupedExperts)):
                if c.dp_replicate * (c.dp_shard // c.ep) > 1:
                    fully_shard(
                        experts,
                        mesh=dp_mesh(dims, "dp_shard_mod_ep"),
                        mp_policy=mp_policy,
                        reshard_after_forward=not keep,
                    )
                else:
                    ignored = set(experts.parameters())
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp_policy,
            ignored_params=ignored,
            reshard_after_forward=not keep,
        )
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    sum_gradients(model)


def sum_gradients(model: nn.Module) -> None:
    """Have every FSDP module of ``model`` sum gradients over its ranks, not average them."""
    for module in model.modules():
        if isinstance(module, FSDPModule):  # plain sums (gloo has no pre-multiplied sum)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _sum_hook(group, bucket):  # unannotated: DDP rejects the string annotations of this module
    """DDP communication hook: sum a gradient bucket over the ranks (DDP's default averages)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_ddp(model: nn.Module, dims: ParallelDims) -> DistributedDataParallel:
    """Replicate ``model`` over the data-parallel ranks (ZeRO-1 shards its optimizer)."""
    group = dims["dp"].get_group()
    ddp = DistributedDataParallel(model, process_group=group, broadcast_buffers=False)
    ddp.register_comm_hook(group, _sum_hook)
    return ddp
