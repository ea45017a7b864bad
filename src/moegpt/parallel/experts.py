"""Expert parallelism and tensor-parallel experts.

Expert parallelism (``ep`` ranks drawn from the data-parallel ranks, each with different
tokens): every rank keeps ``n_experts / ep`` whole experts. The router's sorted slots are sent
to the ranks owning their experts with one uneven ``all_to_all_single``, regrouped by local
expert and run as one grouped GEMM, and sent back by the reverse exchange; autograd runs the
same exchanges backwards, so each expert's gradient sums every rank's tokens.

Tensor-parallel experts (``tp`` ranks, same tokens): every rank keeps each of its experts'
hidden units ``1/tp``; the partial outputs are summed over the TP ranks. Both compose: on an
``ep x tp`` layout a rank holds a hidden slice of its share of the experts.

The expert weights become DTensors (``Shard(0)`` over ``ep``, the hidden dimension over
``tp``), so checkpoints hold the whole experts whatever the layout.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_tensor,
)

from moegpt.model.moe import GroupedExperts
from moegpt.parallel.mesh import ParallelDims

# The hidden dimension of each expert weight (expert, out, in): w1/w3 produce it, w2 reads it.
HIDDEN_DIM = {"w1": 1, "w3": 1, "w2": 2}


@dataclass
class _Exchange:
    """How one layer's slots travelled, to send the results back the same way."""

    order: torch.Tensor  # received slots -> grouped by local expert
    send_splits: list[int]
    recv_splits: list[int]


def _dispatch(
    x: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup, n_local: int
) -> tuple[torch.Tensor, torch.Tensor, _Exchange]:
    """Send each slot to the rank owning its expert; return the received slots sorted by local
    expert, the slots per local expert, and the exchange to undo."""
    ep = dist.get_world_size(group)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # [source rank, local expert]
    send_splits = counts.view(ep, n_local).sum(dim=1).tolist()
    recv_splits = received.view(ep, n_local).sum(dim=1).tolist()
    out = x.new_empty(sum(recv_splits), x.shape[1])
    slots = dist_fn.all_to_all_single(out, x, recv_splits, send_splits, group=group)
    # Received slots come grouped by source rank, then local expert: regroup by expert.
    expert_of_slot = torch.arange(n_local, device=x.device).repeat(ep)
    expert_of_slot = expert_of_slot.repeat_interleave(received)
    order = torch.argsort(expert_of_slot, stable=True)
    local_counts = received.view(ep, n_local).sum(dim=0)
    return slots[order], local_counts, _Exchange(order, send_splits, recv_splits)


def _combine(y: torch.Tensor, exchange: _Exchange, group: dist.ProcessGroup) -> torch.Tensor:
    """Undo :func:`_dispatch` for the experts' outputs."""
    back = torch.empty_like(y)
    back = back.index_copy(0, exchange.order, y)  # differentiable inverse of y = slots[order]
    out = y.new_empty(sum(exchange.send_splits), y.shape[1])
    return dist_fn.all_to_all_single(
        out, back, exchange.send_splits, exchange.recv_splits, group=group
    )


def _replicated_input(x: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; backward sums the TP ranks' partial input gradients."""
    replicated = DTensor.from_local(x, tp_mesh, [Replicate()], run_check=False)
    return replicated.to_local(grad_placements=[Partial()])


def _sum_partial(y: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """Sum the TP ranks' partial outputs (all-reduce); backward passes the gradient through."""
    partial = DTensor.from_local(y, tp_mesh, [Partial()], run_check=False)
    return partial.redistribute(tp_mesh, [Replicate()]).to_local()


def shard_experts(experts: GroupedExperts, dims: ParallelDims) -> None:
    """Shard ``experts`` in place: by expert over ``ep``, by hidden unit over ``tp``."""
    ep, tp = dims.config.ep, dims.config.tp
    names = tuple(name for name, size in (("ep", ep), ("tp", tp)) if size > 1)
    if not names:
        return
    mesh = dims[names]
    for name, weight in experts.weights().items():
        placements: list[Placement] = []
        if ep > 1:
            placements.append(Shard(0))
        if tp > 1:
            placements.append(Shard(HIDDEN_DIM[name]))
        sharded = distribute_tensor(weight.detach(), mesh, placements)
        setattr(experts, name, torch.nn.Parameter(sharded))

    ep_group = dims["ep"].get_group() if ep > 1 else None
    if ep_group is not None:  # the exchange sends rows sorted by expert, never in token order
        experts.max_gathered_slots = 0
    tp_mesh = dims["tp"] if tp > 1 else None
    n_local = experts.w1.shape[0] // ep

    def forward(
        self: GroupedExperts,
        x: torch.Tensor,
        counts: torch.Tensor | None = None,
        expert_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if tp_mesh is not None:
            x = _replicated_input(x, tp_mesh)
        exchange = None
        if ep_group is not None:
            x, counts, exchange = _dispatch(x, counts, ep_group, n_local)
        local = {name: w.to_local() for name, w in self.weights().items()}
        y = self.compute(x, counts, local, expert_ids)
        if tp_mesh is not None:
            y = _sum_partial(y, tp_mesh)
        return y if exchange is None else _combine(y, exchange, ep_group)

    # The instance's forward, not the class's: the model code stays unaware of the layout.
    experts.forward = types.MethodType(forward, experts)
