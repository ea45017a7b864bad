"""Reading a model folder straight into a tensor-parallel layout: each rank reads only the
slices of the weights it holds (safetensors ``get_slice``), never a whole sharded tensor.

The model is built on the meta device and split with the training code's plan, so modules and
DTensor placements are exactly the training layout's; each parameter's local shape and offset
in the whole tensor follow from its placements, and that block is the only part of the file
the rank reads. Replicated parameters (norms, the router, MQA's K/V, a tied embedding) are
read whole, since every rank needs them whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.weights import CheckedFolder, open_weights, weight_problem

_PROBLEMS = ("values beyond {dtype}'s range", "NaN or infinite values")


@dataclass
class ReadStats:
    """What one rank read: elements in all, and of the tensors it holds a slice of."""

    elements: int = 0
    sharded_elements: int = 0  # read of sharded tensors
    sharded_total: int = 0  # those tensors' whole sizes
    whole: list[str] = field(default_factory=list)  # tensors read whole


def local_block(tensor: torch.Tensor) -> tuple[slice, ...] | None:
    """The block of the whole tensor this rank holds of ``tensor`` (a DTensor), as slices;
    None for a plain tensor or a replicated DTensor (held whole)."""
    if not isinstance(tensor, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    if tuple(shape) == tuple(tensor.shape):
        return None
    return tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))


@torch.no_grad()
def fill_shards(
    model: Transformer,
    folder: CheckedFolder,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> ReadStats:
    """Materialise ``model`` (on the meta device, already split) on ``device`` in
    ``folder.dtype`` and fill every parameter and buffer with this rank's block of the file.

    Each rank checks the values it reads; a refused tensor is reported by every rank of
    ``group`` (one all-reduce), so no rank goes on to wait for a peer that stopped.
    """
    if any(not t.is_meta for t in model.state_dict().values()):
        raise ValueError("fill_shards expects a model built on the meta device")
    persistent = set(model.state_dict())
    stray = [name for name, _ in model.named_buffers() if name not in persistent]
    if stray:  # nothing in the file would initialise them
        raise ValueError(f"fill_shards cannot initialise non-persistent buffers {stray}")
    model.to(folder.dtype)  # on the meta device: nothing is allocated
    model.to_empty(device=device)
    state = model.state_dict()
    names = list(state)
    refused = len(names) * 2  # (index of the first refused tensor) * 2 + kind; none: past all
    stats = ReadStats()
    with open_weights(folder.weights_path, "cpu") as f:
        for index, name in enumerate(names):
            target = state[name]
            block = local_block(target)
            if block is None:
                stored = f.get_tensor(name)
                stats.whole.append(name)
            else:
                stored = f.get_slice(name)[block]
                stats.sharded_elements += stored.numel()
                stats.sharded_total += target.numel()
            stats.elements += stored.numel()
            cast, problem = weight_problem(stored, folder.dtype)
            if problem is not None:
                refused = index * 2 + int(problem == _PROBLEMS[1])
                break
            local = target.to_local() if isinstance(target, DTensor) else target
            if local.shape != cast.shape:
                raise AssertionError(f"{name}: block {tuple(cast.shape)} for {tuple(local.shape)}")
            local.copy_(cast)
            del stored, cast
    if group is not None and dist.get_world_size(group) > 1:
        first = torch.tensor([refused], dtype=torch.int64, device=device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
        refused = int(first)
    if refused < len(names) * 2:
        problem = _PROBLEMS[refused % 2].format(dtype=folder.dtype)
        raise UserError(f"{folder.weights_path}: tensor {names[refused // 2]} has {problem}")
    return stats
