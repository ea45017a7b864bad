"""Decode rates of the serving engine at one tensor-parallel size, for `multi_gpu.py --phases
serving`: one engine over a model folder (under torchrun for TP > 1, rank 0 measuring), then
for each batch size a warm-up run and the median of three timed runs of `--output-len` tokens
a prompt. It reports the whole run's tokens/s (the prompt step included), the prompt step's
time and the median decode step (tokens/s decoding alone = batch / step).

    torchrun --standalone --nproc-per-node 2 benchmarks/serve_tp.py FOLDER --tp 2 --out r.json
    python benchmarks/serve_tp.py FOLDER --out r.json                     # TP1, one process
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from moegpt.config import ServeConfig
from moegpt.serve.engine import Engine
from moegpt.serve.sequence import SamplingParams


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def measure(engine: Engine, batch: int, output_len: int, repeats: int) -> dict:
    """The median of ``repeats`` runs of ``batch`` prompts, after one warm-up run."""
    prompts = [f"def function_{i}(x, y):\n    return" for i in range(batch)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    runs = []
    for _ in range(repeats):
        engine.stats.step_seconds.clear()
        sync(engine)
        started = time.perf_counter()
        engine.generate(prompts, params)
        sync(engine)
        seconds = time.perf_counter() - started
        steps = list(engine.stats.step_seconds)
        runs.append(
            {
                "tokens_per_second": batch * output_len / seconds,
                "prompt_step_ms": steps[0] * 1e3,
                "decode_step_ms": statistics.median(steps[1:]) * 1e3,
            }
        )
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    median["decode_tokens_per_second"] = batch / median["decode_step_ms"] * 1e3
    return {"batch": batch, **median}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", help="exported model folder")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (torchrun ranks)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--verify-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hash the weights file against config.json at load (serve.verify_weights)",
    )
    parser.add_argument(
        "--custom-all-reduce",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="sum small activations through symmetric memory (serve.custom_all_reduce)",
    )
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    config = ServeConfig(
        tp=args.tp,
        compile=args.compile,
        max_batch_size=max(batches),
        verify_weights=args.verify_weights,
        custom_all_reduce=args.custom_all_reduce,
    )

    def work(engine: Engine) -> None:
        print(f"serve_tp: {engine.describe()}", file=sys.stderr, flush=True)
        rows = []
        for batch in batches:  # a run cut short by its caller's limit still shows its rows
            rows.append(measure(engine, batch, args.output_len, args.repeats))
            print(f"serve_tp: {rows[-1]}", file=sys.stderr, flush=True)
        result = {"tp": args.tp, "compile": args.compile, "engine": engine.describe()}
        result["custom_all_reduce"] = args.custom_all_reduce and args.tp > 1
        result["output_len"], result["repeats"], result["batches"] = (
            args.output_len,
            args.repeats,
            rows,
        )
        Path(args.out).write_text(json.dumps(result, indent=2))

    if args.tp > 1:
        from moegpt.serve.tp_engine import run_rank

        run_rank(args.folder, config, 600.0, work)
    else:
        with Engine.from_folder(args.folder, config) as engine:
            work(engine)


if __name__ == "__main__":
    main()
