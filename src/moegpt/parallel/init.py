"""Meta-device initialisation: build the model without memory, lay it out, then give each
rank only its own shards, initialised to what one process holds.

``parallelize`` builds every model on the meta device, so no rank ever holds the whole
model (a recipe larger than one GPU can then be laid out with FSDP2, TP, EP or PP, as
torchtitan does). :func:`materialize` then allocates each rank's shards and fills them, by
the model's own rule (``init_parameter``) from generators seeded by the run's seed and the
parameter's name: each parameter is drawn whole, one at a time, and the rank keeps its
slice; an expert weight (experts, out, in) is drawn expert by expert, each from its own
generator, and only the experts a rank holds. One process draws the same tensors, so every
layout starts from the same weights, whatever order the ranks hold them in.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moegpt.model.moe import GroupedExperts
from moegpt.model.transformer import Transformer
from moegpt.model.vision import VisionLanguageModel
from moegpt.parallel.names import parameter_name


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name`` in a run seeded ``seed`` (stable across
    processes and Python versions, unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative 63-bit integer


@torch.no_grad()
def materialize(model: Transformer | VisionLanguageModel, device: torch.device, seed: int) -> None:
    """Allocate ``model``'s parameters (built on the meta device, laid out or not) on
    ``device`` and initialise them: this rank's part of each parameter as drawn in full
    from its own generator (expert weights by expert). Wrappers (activation checkpointing,
    compile) may be inside ``model``."""
    experts = {
        f"{parameter_name(prefix)}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, GroupedExperts)
        for name in module.weights()
    }
    model.to_empty(device=device)
    for wrapped, param in model.named_parameters():
        name = parameter_name(wrapped)
        if name in experts:
            _draw_experts(model, name, param, device, seed)
            continue
        full = torch.empty(param.shape, dtype=param.dtype, device=device)  # global shape
        model.init_parameter(name, full, _generator(seed, name, device))
        if isinstance(param, DTensor):  # the slice this rank holds, cut locally (no traffic)
            mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(mine.to_local())
        else:
            param.copy_(full)
        del full


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(parameter_seed(seed, name))


def _draw_experts(
    model: nn.Module, name: str, param: torch.Tensor, device: torch.device, seed: int
) -> None:
    """Expert weight ``name`` (experts, out, in): each expert this rank holds any of, drawn
    whole from its own generator (``name[e]``), then its block of rows and columns kept."""
    local = param.to_local() if isinstance(param, DTensor) else param
    offset: tuple[int, ...] = (0, 0, 0)
    if isinstance(param, DTensor):  # the block of the whole tensor this rank holds
        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        # A box: true of every layout parallelize makes (EP, TP, FSDP2's strided shards).
        assert tuple(shape) == tuple(local.shape), (name, shape, tuple(local.shape))
    rows = slice(offset[1], offset[1] + local.shape[1])
    cols = slice(offset[2], offset[2] + local.shape[2])
    for index in range(local.shape[0]):
        expert = offset[0] + index
        full = torch.empty(param.shape[1:], dtype=param.dtype, device=device)
        model.init_parameter(name, full, _generator(seed, f"{name}[{expert}]", device))
        local[index].copy_(full[rows, cols])
