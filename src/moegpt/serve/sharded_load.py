"""Reading a model folder straight into a tensor-parallel layout: each rank reads only the
slices of the weights it holds (safetensors ``get_slice``), never a whole sharded tensor.

The model is built on the meta device and split (:func:`moegpt.parallel.serving.shard_for_serving`),
which says which block of each whole tensor a rank holds; that block is the only part of the
file the rank reads. Replicated parameters (norms, the router, MQA's K/V, a tied embedding)
are read whole, since every rank needs them whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.parallel.serving import Block
from moegpt.weights import CheckedFolder, open_weights, weight_problem

_PROBLEMS = ("values beyond {dtype}'s range", "NaN or infinite values")


@dataclass
class ReadStats:
    """What one rank read: elements in all, and of the tensors it holds a slice of."""

    elements: int = 0
    sharded_elements: int = 0  # read of sharded tensors
    sharded_total: int = 0  # those tensors' whole sizes
    whole: list[str] = field(default_factory=list)  # tensors read whole


@torch.no_grad()
def fill_shards(
    model: Transformer,
    folder: CheckedFolder,
    device: torch.device,
    blocks: dict[str, Block],
    group: dist.ProcessGroup | None = None,
) -> ReadStats:
    """Materialise ``model`` (on the meta device, already split) on ``device`` in
    ``folder.dtype`` and fill every parameter and buffer with this rank's block of the file:
    ``blocks[name]`` for a split one, the whole tensor for the rest.

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
            block = blocks.get(name)
            if block is None:
                stored = f.get_tensor(name)
                stats.whole.append(name)
            else:
                stored = f.get_slice(name)[block]
                stats.sharded_elements += stored.numel()
                stats.sharded_total += math.prod(folder.header[name][1])  # the whole tensor
            stats.elements += stored.numel()
            cast, problem = weight_problem(stored, folder.dtype)
            if problem is not None:
                refused = index * 2 + int(problem == _PROBLEMS[1])
                break
            if target.shape != cast.shape:
                raise AssertionError(f"{name}: block {tuple(cast.shape)} for {tuple(target.shape)}")
            target.copy_(cast)
            del stored, cast
    if group is not None and dist.get_world_size(group) > 1:
        first = torch.tensor([refused], dtype=torch.int64, device=device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
        refused = int(first)
    if refused < len(names) * 2:
        problem = _PROBLEMS[refused % 2].format(dtype=folder.dtype)
        raise UserError(f"{folder.weights_path}: tensor {names[refused // 2]} has {problem}")
    return stats
