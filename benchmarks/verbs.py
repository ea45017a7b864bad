"""What the benchmarks that drive `moegpt` verbs share: running a verb as a user would, and
saving a result table as JSON and text."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from moegpt.train.metrics import read_metrics


def moegpt_streamed(*args: str) -> None:
    """Run a long verb with its progress printed as it goes (a run cut short by a time limit
    still shows how far it got)."""
    done = subprocess.run([sys.executable, "-m", "moegpt.cli", *args], check=False)
    if done.returncode:
        raise SystemExit(f"moegpt {' '.join(args)} failed (exit {done.returncode})")


def moegpt(*args: str) -> str:
    """Run a verb; its stdout (a failure stops the benchmark with the verb's error)."""
    done = subprocess.run(
        [sys.executable, "-m", "moegpt.cli", *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"moegpt {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def median_train_metrics(run: Path, *keys: str) -> dict[str, float | None]:
    """The medians of ``keys`` (``tokens_per_second``, ``mfu``) over a run's training records
    in its metrics.jsonl (the median skips the first steps' compilation); None where no
    record has a value."""
    records = [e for e in read_metrics(run) if e.get("kind") == "train"]
    medians: dict[str, float | None] = {}
    for key in keys:
        values = [e[key] for e in records if e.get(key) is not None]
        medians[key] = statistics.median(values) if values else None
    return medians


def save(out: str, stem: str, result: dict[str, Any], table: str) -> None:
    """Print ``table`` and write ``OUT/STEM.json`` and ``OUT/STEM.txt``, each whole or not
    at all (benchmarks save as they go, and may be killed at any moment)."""
    print(table)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in ((f"{stem}.json", json.dumps(result, indent=2)), (f"{stem}.txt", table)):
        partial = folder / f".{path}.partial"
        partial.write_text(text + "\n")
        os.replace(partial, folder / path)


def rate(tokens_per_second: float | None) -> str:
    """A table's tokens/s cell: ``-`` where nothing was measured (a parent trained elsewhere)."""
    return "-" if tokens_per_second is None else f"{tokens_per_second:,.0f}"


def exact_match_table(title: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    """`moegpt eval --task instruct --json` results before and after tuning, by kind, with
    the reference answers' mean loss where the results have it."""
    kinds = list(before["by_kind"])
    header = "model    " + "  ".join(f"{k:>9}" for k in kinds) + "        all"
    lines = [title, header + "  answer loss (nats a token)"]
    for name, r in (("before", before), ("after", after)):
        cells = "  ".join(f"{r['by_kind'][k]['accuracy']:>9.1%}" for k in kinds)
        loss = f"{r['answer_loss']:>12.4f}" if "answer_loss" in r else f"{'-':>12}"
        lines.append(f"{name:<7}  {cells}  {r['accuracy']:>9.1%}  {loss}")
    return "\n".join(lines)


def device_tag() -> str:
    """``cpu``, or the GPU's model as a short name (``h100``)."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    return next((tag for tag in ("h200", "h100", "a100") if tag in name), "cuda")
