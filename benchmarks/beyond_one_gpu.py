"""Training a recipe larger than one GPU, laid out over several: the planner against the run.

`configs/xl-moe.toml` (20B parameters; 322 GB of fp32 weights, gradients and AdamW moments)
fits no single GPU here. Under FSDP2 x EP every rank builds only its shards (the model is built
on the meta device and each rank materialises its part), so it trains on four. This runs the
recipe as a user would (`moegpt prepare`, `moegpt plan --json`, `moegpt train --nproc N`) for a
few steps and prints, per rank, what the plan says against what the run measured: weights,
gradients and optimizer bytes, and peak memory; and the run's tokens/s and MFU (the median over
the steps after ``--warmup``).

    python benchmarks/beyond_one_gpu.py --nproc 4 --gpu h200 --out DIR       # four GPUs
    python benchmarks/beyond_one_gpu.py --config configs/tiny.toml --nproc 2 \\
        --layout=--parallel.dp_shard=2 --layout=--parallel.ep=2 --steps 4 --warmup 1  # CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

import torch
from verbs import device_tag, moegpt, moegpt_streamed, save

from moegpt.console import human
from moegpt.train.metrics import read_metrics

PARTS = ("params", "grads", "optimizer")
PLANNED = {"params": "weights", "grads": "grads", "optimizer": "optimizer"}


def table(result: dict) -> str:
    plan, ranks = result["plan_memory"], result["ranks"]
    lines = [
        f"{result['config']} ({human(result['parameters'])} parameters) on {result['nproc']} "
        f"x {result['device']}, {' '.join(result['layout']) or 'the recipe layout'}; "
        f"{result['steps']} steps",
        "per rank (GB)      plan  " + "  ".join(f"rank {r:>2}" for r in range(len(ranks))),
    ]
    for part in PARTS:
        measured = "  ".join(f"{r[part] / 1e9:7.2f}" for r in ranks)
        lines.append(f"  {part:<14} {plan[PLANNED[part]] / 1e9:7.2f}  {measured}")
    if all("peak_allocated" in r for r in ranks):
        peaks = "  ".join(f"{r['peak_allocated'] / 1e9:7.2f}" for r in ranks)
        lines.append(f"  {'peak':<14} {plan['total'] / 1e9:7.2f}  {peaks}")
    mfu = result["mfu"]
    lines.append(
        f"tokens/s {result['tokens_per_second']:,.0f}, "
        + ("MFU n/a (CPU)" if mfu is None else f"MFU {100 * mfu:.1f}% of the datasheet bf16 peak")
        + f" (median of the steps after the first {result['warmup']})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/xl-moe.toml")
    parser.add_argument("--nproc", type=int, default=4, help="ranks (GPUs, or CPU processes)")
    parser.add_argument(
        "--layout",
        action="append",
        default=[],
        help="a config override for the layout and batch (repeatable), e.g. "
        "--layout=--parallel.ep=2",
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the medians")
    parser.add_argument("--gpu", default="h100-sxm", help="the planner's GPU preset")
    parser.add_argument("--run-dir", default="runs/beyond-one-gpu")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    run = Path(args.run_dir)
    if run.exists() and any(run.iterdir()) and not (run / "metrics.jsonl").is_file():
        parser.error(f"--run-dir {run}: exists and is not a training run; not removing it")
    moegpt_streamed("prepare", "--config", args.config)
    plan = json.loads(
        moegpt("plan", "--config", args.config, "--gpu", args.gpu, "--json", *args.layout)
    )
    # Cut to a few steps, the run would warm up to the recipe's peak rate in them (the warm-up
    # ends with the run), and xl-moe's router collapsed onto a few experts by step 4 at
    # 1e-4. Its first steps run at the rates the recipe's own warm-up gives them instead
    # (by steps: the recipe has no batch ramp, under which the warm-up counts sequences).
    rate = plan["learning_rate"]
    lr = rate["peak"] * min(1.0, args.steps / max(rate["warmup_steps"], 1))
    overrides = [*args.layout, f"--train.steps={args.steps}", "--train.log_every=1"]
    overrides += ["--train.eval_every=1000000", "--checkpoint.every=1000000", f"--train.lr={lr}"]
    shutil.rmtree(run, ignore_errors=True)  # a fresh run, not a resumed one
    launch = ["--config", args.config, "--nproc", str(args.nproc), "--run-dir", str(run)]
    moegpt_streamed("train", *launch, *overrides)
    records = read_metrics(run)
    steps = [r for r in records if r.get("kind") == "train" and r["step"] > args.warmup]
    ranks = next(r["ranks"] for r in records if r.get("kind") == "ranks")
    mfus = [r["mfu"] for r in steps if r.get("mfu") is not None]
    result = {
        "config": args.config,
        "layout": args.layout,
        "nproc": args.nproc,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": args.steps,
        "warmup": args.warmup,
        "parameters": plan["parameters"]["total"],
        "plan_gpu": args.gpu,
        "plan_memory": plan["memory"],
        "ranks": ranks,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steps),
        "mfu": statistics.median(mfus) if mfus else None,
    }
    stem = f"beyond_one_gpu-{Path(args.config).stem}-{device_tag()}-{args.nproc}"
    save(args.out, stem, result, table(result))


if __name__ == "__main__":
    main()
