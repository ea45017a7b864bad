"""`moegpt report RUN_DIR`: PNG plots of a run's metrics and a short text summary."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from moegpt.config import load_config
from moegpt.errors import UserError
from moegpt.train.metrics import read_metrics


def _series(events: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in events if e["kind"] == kind and e.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def summary(events: list[dict[str, Any]]) -> str:
    train = [e for e in events if e["kind"] == "train"]
    evals = [e for e in events if e["kind"] == "eval"]
    if not train:
        return "no training steps recorded\n"
    first, last = train[0], train[-1]
    # The run's median step, not the last one's (a step that waited on a save or an
    # evaluation would stand for the whole run).
    rate = _median(train, "tokens_per_second")
    flops = _median(train, "flops_per_second")
    mfu = _median(train, "mfu")
    lines = [
        f"steps: {last['step']}, tokens: {sum(e['tokens'] for e in train):,}",
        f"loss: {first['loss']:.4f} at step {first['step']} -> "
        f"{last['loss']:.4f} at step {last['step']}",
        f"throughput (median over {len(train)} steps): {rate:,.0f} tokens/s, "
        f"{flops / 1e12:.2f} TFLOP/s, "
        + ("MFU n/a (no known peak)" if mfu is None else f"MFU {mfu:.1%}"),
    ]
    if "expert_load_max" in last:
        lines.append(
            f"router: load {last['expert_load_min']:.2f}-{last['expert_load_max']:.2f}x of mean, "
            f"balance loss {last['load_balance_loss']:.3f}, dropped {last['dropped_fraction']:.1%}"
        )
    if evals:
        scores = {k: v for k, v in evals[-1].items() if k.endswith("/loss")}
        lines.append(
            f"held-out loss at step {evals[-1]['step']}: "
            + ", ".join(f"{k[:-5]} {v:.4f}" for k, v in sorted(scores.items()))
        )
    return "\n".join(lines) + "\n"


def _loss_unit(run_dir: Path) -> str:
    """What the run's loss is a mean over: label tokens, or images for the CLIP stage."""
    recipe = run_dir / "config.toml"  # the trainer's copy of the run's recipe
    if recipe.is_file() and load_config(recipe).vision.clip_stage:
        return "image"
    return "token"


def _median(steps: list[dict[str, Any]], key: str) -> float | None:
    values = [e[key] for e in steps if e.get(key) is not None]
    return statistics.median(values) if values else None


def write_report(run_dir: Path) -> list[Path]:
    """Write loss.png, eval_loss.png, throughput.png, expert_load.png and summary.txt."""
    events = read_metrics(run_dir)
    if not events:
        raise UserError(f"{run_dir}: no metrics.jsonl to report on")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'moegpt[report]'") from None

    written = []
    unit = _loss_unit(run_dir)

    def plot(name: str, title: str, ylabel: str, lines: dict[str, tuple[list, list]]) -> None:
        lines = {label: xy for label, xy in lines.items() if xy[0]}
        if not lines:
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
        fig.tight_layout()
        path = run_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    plot(
        "loss.png",
        "training loss",
        f"loss (nats/{unit})",
        {"train": _series(events, "train", "loss")},
    )
    eval_keys = sorted({k for e in events if e["kind"] == "eval" for k in e if k.endswith("/loss")})
    plot(
        "eval_loss.png",
        "held-out loss",
        f"loss (nats/{unit})",
        {k[:-5]: _series(events, "eval", k) for k in eval_keys},
    )
    mfu = _series(events, "train", "mfu")
    if mfu[0]:
        plot("throughput.png", "model FLOPs utilisation", "MFU", {"mfu": mfu})
    else:
        plot(
            "throughput.png",
            "throughput",
            "tokens/s",
            {"tokens/s": _series(events, "train", "tokens_per_second")},
        )
    plot(
        "expert_load.png",
        "expert load (multiple of the mean)",
        "load",
        {
            "busiest": _series(events, "train", "expert_load_max"),
            "idlest": _series(events, "train", "expert_load_min"),
        },
    )
    text = run_dir / "summary.txt"
    text.write_text(summary(events))
    written.append(text)
    return written
