"""Train parallel layouts for the tests: run under torchrun (or in-process for the
one-process reference). Each job resumes its run directory, trains a few steps, saves, and
rank 0 writes what the tests compare: the losses, each rank's state bytes and the full final
parameters.

    torchrun --nproc-per-node N tests/parallel/worker.py JOBS.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from moegpt.config import load_config
from moegpt.parallel.mesh import ParallelDims, init_distributed
from moegpt.train.trainer import Trainer


def full_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the model as whole tensors, on rank 0 (and in one process)."""
    state: dict[str, torch.Tensor] = {}
    for model in trainer.parts.models:
        part = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        state |= {k: v.detach().cpu().clone() for k, v in part.items()}
    if not dist.is_initialized():
        return state
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, state)
    merged: dict[str, torch.Tensor] = {}
    for part in everyone:
        merged |= part
    return merged


def run_job(job: dict[str, Any], distributed: bool) -> None:
    """Resume ``run_dir``, train ``steps`` steps, save, evaluate; write ``out``.json and
    .safetensors."""
    config = load_config(Path(job["recipe"]), job["overrides"])
    device = torch.device("cpu")
    dims = ParallelDims.build(config.parallel, device) if distributed else None
    trainer = Trainer(config, Path(job["run_dir"]), device=device, log=lambda m: None, dims=dims)
    trainer.resume()
    batches = iter(trainer.loader)
    losses = [trainer.train_step(batches)["loss"] for _ in range(job["steps"])]
    memory = trainer.rank_memory()
    trainer.save()
    scores = trainer.evaluate()
    params = full_parameters(trainer)
    if trainer.rank0:
        out = Path(job["out"])
        record = {"losses": losses, "ranks": memory, "eval": scores}
        out.with_suffix(".json").write_text(json.dumps(record))
        save_file({k: v.contiguous() for k, v in params.items()}, out.with_suffix(".safetensors"))


def main(jobs_file: str) -> None:
    init_distributed(torch.device("cpu"), timeout_s=120)
    for job in json.loads(Path(jobs_file).read_text()):
        run_job(job, distributed=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
