"""Fault injection: run `moegpt train` to completion while SIGKILLing it at random moments.

Used by the tests and ``benchmarks/kill_resume.py`` to prove that checkpoints survive being
killed at any moment (saves included) and that resuming is exact.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from moegpt.config import load_config


def _metrics_inode(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    return path.stat().st_ino if path.is_file() else None


def _last_step_of_attempt(run_dir: Path, inode_at_launch: int | None) -> int:
    """The highest step logged since the attempt began (0 if none yet). Every start rewrites
    metrics.jsonl (a new file), cut back to the step it resumes from, before it logs: while
    the file is the one found at launch, its rows are all earlier attempts'. After the
    rewrite the kept rows end at the resumed step, which the attempt has reached."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file() or path.stat().st_ino == inode_at_launch:
        return 0
    steps = []
    for line in path.read_bytes().decode(errors="replace").splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):  # a line cut by a kill
            continue
    return max(steps, default=0)


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def wait_for_step(
    process: subprocess.Popen, run_dir: Path, step: int, inode_at_launch: int | None = None
) -> None:
    """Block until the run started with metrics.jsonl at ``inode_at_launch`` (None: no such
    file then) logs ``step``, or exits."""
    while process.poll() is None and _last_step_of_attempt(run_dir, inode_at_launch) < step:
        time.sleep(0.01)


def launch_training(recipe: Path, run_dir: Path, extra: Sequence[str] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moegpt.cli",
            "train",
            "--config",
            str(recipe),
            "--run-dir",
            str(run_dir),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def train_with_kills(recipe: Path, run_dir: Path, kills: int, seed: int = 0) -> int:
    """Train to the end, SIGKILLing the trainer ``kills`` times and relaunching it each time.

    Kill moments are spread over the run: the i-th kill lands a random 0-50 ms after the
    trainer first logs a randomly drawn target step, i.e. inside a step or a checkpoint save.
    Returns the kills that landed (a process that finished first is not counted).
    """
    steps = load_config(recipe).train.steps
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, steps - 1), min(kills, steps - 2)))
    landed = 0
    while True:
        inode = _metrics_inode(run_dir)
        process = launch_training(recipe, run_dir)
        if landed < len(targets):
            wait_for_step(process, run_dir, targets[landed], inode)
            time.sleep(rng.uniform(0.0, 0.05))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                landed += 1
                continue
        code = process.wait()
        if code != 0:
            raise RuntimeError(f"training exited with status {code}")
        return landed
