"""A rank SIGKILLed mid-run under torchrun: the job ends (no hang) and a relaunch resumes from
the last complete checkpoint to the same result as an uninterrupted one-process run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from moegpt.harness.faults import child_pids, launch_training, wait_for_step
from moegpt.train.metrics import read_metrics
from moegpt.train.trainer import Trainer
from tests.conftest import make_config, recipe

LAYOUT = ["--parallel.dp_shard", "2", "--nproc", "2"]


def test_killed_rank_ends_the_job_and_the_relaunch_resumes(tmp_path: Path, prepared: Path) -> None:
    path = recipe(tmp_path, prepared, steps=12, global_batch_size=8)
    reference = tmp_path / "reference"
    Trainer(
        make_config(tmp_path, prepared, steps=12, global_batch_size=8),
        reference,
        log=lambda m: None,
    ).run(progress=False)

    run = tmp_path / "run"
    job = launch_training(path, run, LAYOUT)
    wait_for_step(job, run, 5)  # checkpoints every 3 steps: step 3 is on disk
    (torchrun,) = child_pids(job.pid)
    ranks = child_pids(torchrun)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)
    assert job.wait(timeout=120) != 0  # the other rank is stopped, not left hanging

    logged_before = (run / "metrics.jsonl").read_text().count('"kind": "train"')
    relaunched = launch_training(path, run, LAYOUT)
    assert relaunched.wait(timeout=300) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()[logged_before:]
    resumed_at = min(json.loads(line)["step"] for line in lines if '"train"' in line)
    assert 3 < resumed_at <= logged_before  # from a checkpoint, not from scratch
    got = [e["loss"] for e in read_metrics(run) if e["kind"] == "train"]
    want = [e["loss"] for e in read_metrics(reference) if e["kind"] == "train"]
    assert got == pytest.approx(want, rel=1e-5)
