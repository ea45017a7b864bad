"""Fault injection: run `moegpt train` to completion while SIGKILLing it at random moments.

Used by the tests and ``benchmarks/kill_resume.py`` to prove that checkpoints survive being
killed at any moment (saves included) and that resuming is exact.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


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


def train_with_kills(
    recipe: Path, run_dir: Path, kills: int, seed: int = 0, max_delay: float = 0.6
) -> int:
    """Train to the end, relaunching after each of ``kills`` SIGKILLs delivered a random
    0..``max_delay`` seconds after the trainer logged new progress; return the kills that
    landed (a process that finished first is not counted)."""
    rng = random.Random(seed)
    landed = 0
    while True:
        process = launch_training(recipe, run_dir)
        if landed < kills:
            before = _steps_logged(run_dir)
            while process.poll() is None and _steps_logged(run_dir) <= before:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, max_delay))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                landed += 1
                continue
        code = process.wait()
        if code != 0:
            raise RuntimeError(f"training exited with status {code}")
        return landed
