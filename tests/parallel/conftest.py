"""Run the parallel layouts once per session: one torchrun job per world size trains every
layout of that size (and the resharding legs), the reference runs in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from moegpt.config import Config, load_config
from moegpt.harness.jobs import run_job
from tests.conftest import recipe

STEPS = 5
# Every layout trains this model: 4 layers (so interleaved 1F1B has 4 stages), MQA, 4 experts,
# document masks (pipeline stages get positions and document ids as keyword inputs).
BASE = ["--model.n_layers", "4", "--data.document_mask", "true", "--train.eval_batches", "4"]
PP2 = ["--parallel.pp", "2", "--parallel.pp_microbatches", "2"]

# name -> (ranks, [parallel] overrides)
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "fsdp2": (2, ["--parallel.dp_shard", "2"]),
    "fsdp2-recompute": (2, ["--parallel.dp_shard", "2", "--train.activation_checkpointing=true"]),
    "fsdp2-keep": (2, ["--parallel.dp_shard", "2", "--parallel.reshard_after_forward=false"]),
    "zero1": (2, ["--parallel.dp_replicate", "2", "--parallel.zero1", "true"]),
    "tp2": (2, ["--parallel.tp", "2"]),
    "pp2-gpipe": (2, [*PP2, "--parallel.pp_schedule", "gpipe"]),
    "pp2-1f1b": (2, [*PP2, "--parallel.pp_schedule", "1f1b"]),
    "pp2-interleaved": (2, [*PP2, "--parallel.pp_schedule", "interleaved_1f1b"]),
    "ep2": (2, ["--parallel.dp_shard", "2", "--parallel.ep", "2"]),
    "hsdp": (4, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"]),
    "tp2-pp2": (4, ["--parallel.tp", "2", *PP2]),
    "dp2-ep2": (4, ["--parallel.dp_shard", "4", "--parallel.ep", "2"]),
    "tp2-ep2": (4, ["--parallel.dp_shard", "2", "--parallel.ep", "2", "--parallel.tp", "2"]),
    "pp2-fsdp2": (4, ["--parallel.dp_shard", "2", *PP2]),
}
# Save at one layout, resume at another: (layout, steps) legs; the last runs in one process.
RESHARD_CHAINS = {
    "reshard": [("tp2-pp2", 2), ("fsdp4", 2), ("single", 1)],
    "reshard-ep-zero1": [("ep2", 2), ("zero1", 2), ("single", 1)],
}
EXTRA = {"fsdp4": ["--parallel.dp_shard", "4"], "single": []}
# A continuation stage (train.init_from a 2-step run, its context doubled with YaRN, its
# embedding frozen) under these layouts, against the same continuation in one process.
CONTINUATION_LAYOUTS = ("fsdp2", "zero1", "tp2-pp2")
CONTINUATION = [
    "--model.max_seq_len=128",
    "--model.rope_scaling.type=yarn",
    "--model.rope_scaling.factor=2",
    "--model.rope_scaling.original_max_seq_len=64",
    "--train.freeze=tok_embeddings.*",
]


@dataclass
class Result:
    config: Config
    losses: list[float]
    ranks: list[dict[str, int]]
    params: dict[str, torch.Tensor]
    eval: dict[str, float]
    initial: dict[str, torch.Tensor] | None = None  # before the first step, where recorded
    aux_losses: list[float] | None = None  # the logged auxiliary loss of each step


def _read(out: Path, config: Config) -> Result:
    info = json.loads(out.with_suffix(".json").read_text())
    params = load_file(out.with_suffix(".safetensors"))
    first = out.with_suffix(".initial.safetensors")
    initial = load_file(first) if first.is_file() else None
    return Result(
        config, info["losses"], info["ranks"], params, info["eval"], initial, info["aux_losses"]
    )


def overrides(name: str) -> list[str]:
    return BASE + (LAYOUTS[name][1] if name in LAYOUTS else EXTRA[name])


def _job(
    root: Path, recipe_path: Path, name: str, run: str, steps: int, extra: list[str] | None = None
) -> dict[str, Any]:
    return {
        "recipe": str(recipe_path),
        "overrides": overrides(name) + (extra or []),
        "run_dir": str(root / "runs" / run),
        "steps": steps,
        "out": str(root / "out" / f"{run}-{name}"),
    }


def _torchrun(ranks: int, jobs: list[dict[str, Any]], root: Path) -> None:
    jobs_file = root / f"jobs-{ranks}.json"
    jobs_file.write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={ranks}", "-m", "moegpt.harness.jobs", str(jobs_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        tail = "\n".join(done.stdout.splitlines()[-20:] + done.stderr.splitlines()[-60:])
        pytest.fail(f"torchrun with {ranks} ranks failed:\n{tail}")


@pytest.fixture(scope="session")
def layout_runs(tmp_path_factory, prepared: Path) -> dict[str, Result]:
    """Every layout's 5-step result, the one-process reference ("single") and the resharded
    chain ("reshard")."""
    root = tmp_path_factory.mktemp("parallel")
    (root / "out").mkdir()
    recipe_path = recipe(root, prepared, steps=STEPS, global_batch_size=8, micro_batch_size=2)
    run_job(_job(root, recipe_path, "single", "parent", 2), distributed=False)
    continuation = [*CONTINUATION, f"--train.init_from={root / 'runs' / 'parent'}"]
    by_size: dict[int, list[dict[str, Any]]] = {2: [], 4: []}
    for name, (ranks, _) in LAYOUTS.items():
        by_size[ranks].append({**_job(root, recipe_path, name, name, STEPS), "initial": True})
    for name in CONTINUATION_LAYOUTS:
        job = _job(root, recipe_path, name, f"continuation-{name}", STEPS, continuation)
        by_size[LAYOUTS[name][0]].append(job)
    for chain, legs in RESHARD_CHAINS.items():
        for name, steps in legs[:-1]:
            ranks = LAYOUTS[name][0] if name in LAYOUTS else 4
            by_size[ranks].append(_job(root, recipe_path, name, chain, steps))
    for ranks, jobs in by_size.items():
        _torchrun(ranks, jobs, root)
    run_job({**_job(root, recipe_path, "single", "single", STEPS), "initial": True}, False)
    job = _job(root, recipe_path, "single", "continuation-single", STEPS, continuation)
    run_job(job, distributed=False)
    for chain, legs in RESHARD_CHAINS.items():
        last, steps = legs[-1]
        run_job(_job(root, recipe_path, last, chain, steps), distributed=False)
    results = {
        name: _read(root / "out" / f"{name}-{name}", load_config(recipe_path, overrides(name)))
        for name in [*LAYOUTS, "single"]
    }
    for name in [*CONTINUATION_LAYOUTS, "single"]:
        config = load_config(recipe_path, overrides(name) + continuation)
        out = root / "out" / f"continuation-{name}-{name}"
        results[f"continuation-{name}"] = _read(out, config)
    for chain, legs in RESHARD_CHAINS.items():
        parts = [
            _read(root / "out" / f"{chain}-{name}", results["single"].config) for name, _ in legs
        ]
        results[chain] = Result(
            results["single"].config,
            [loss for leg in parts for loss in leg.losses],
            parts[0].ranks,
            parts[-1].params,
            parts[-1].eval,
            aux_losses=[aux for leg in parts for aux in leg.aux_losses],
        )
    return results
