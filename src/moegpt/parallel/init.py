"""Meta-device initialisation: build the model without memory, lay it out, then give each
rank only its own shards, initialised to what one process holds.

``parallelize`` builds every model on the meta device, so no rank ever holds the whole
model (a recipe larger than one GPU can then be laid out with FSDP2, TP, EP or PP, as
torchtitan does). :func:`materialize` then allocates each rank's shards and fills them. Each
parameter is drawn in full, one at a time, from a generator seeded by the run's seed and the
parameter's name, by the model's own rule (``init_parameter``), and the rank keeps its
slice. One process draws the same tensors, so every layout starts from the same weights,
whatever order the ranks hold them in.
"""

from __future__ import annotations

import hashlib

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

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
    ``device`` and initialise them: each parameter in full from its own generator, then this
    rank's part of it. Wrappers (activation checkpointing, compile) may be inside ``model``."""
    model.to_empty(device=device)
    for wrapped, param in model.named_parameters():
        name = parameter_name(wrapped)
        generator = torch.Generator(device=device).manual_seed(parameter_seed(seed, name))
        full = torch.empty(param.shape, dtype=param.dtype, device=device)  # global shape
        model.init_parameter(name, full, generator)
        if isinstance(param, DTensor):  # the slice this rank holds, cut locally (no traffic)
            mine = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(mine.to_local())
        else:
            param.copy_(full)
        del full
