"""Opening a tensor-parallel engine: every rank of a torchrun job loads its shard; rank 0
gets the engine, the others follow its steps (see :mod:`moegpt.serve.tensor_parallel`)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from moegpt.config import ServeConfig
from moegpt.parallel.mesh import local_device
from moegpt.serve.engine import Engine, folder_tokenizer, load_draft
from moegpt.serve.runner import build_forward
from moegpt.serve.tensor_parallel import follow, load_sharded


def open_tensor_parallel(
    path: str | Path, config: ServeConfig, timeout_s: float = 600.0
) -> Engine | None:
    """Every rank of a torchrun job calls this. Rank 0 gets the engine over its shard; the
    other ranks follow its steps and get None once rank 0 closes the engine."""
    model, group = load_sharded(path, config.tp, local_device(), timeout_s)
    if dist.get_rank() == 0:  # the draft, if any, runs on rank 0 alone
        tokenizer, eos_id = folder_tokenizer(path)
        draft = load_draft(path, config, model)
        return Engine(model, tokenizer, config, eos_id, tp_group=group, draft=draft)
    follow(build_forward(model, config, group), group)
    return None
