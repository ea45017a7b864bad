"""SIGKILL a training run 10 times at random moments (checkpoint saves included), resume it
each time, and check the result is bit-identical to an uninterrupted run.

    python benchmarks/kill_resume.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from moegpt.config import load_config
from moegpt.data.prepare import prepare
from moegpt.harness.faults import launch_training, train_with_kills
from moegpt.train.export import load_run_model
from moegpt.train.metrics import data_stream

RECIPE = """
[model]
vocab_size = 512
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 1
ffn_hidden = 64
n_experts = 4
top_k = 2
max_seq_len = 64
[data]
seq_len = 32
data_dir = "{data}"
workers = 1
[[data.sources]]
name = "code"
kind = "code"
path = "{stdlib}/json"
epochs = 4
[train]
steps = {steps}
global_batch_size = 4
micro_batch_size = 2
lr = 3e-3
warmup_steps = 3
eval_every = 0
[checkpoint]
every = 3
keep = 2
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = root / "recipe.toml"
        recipe.write_text(
            RECIPE.format(
                data=root / "data", stdlib=sysconfig.get_paths()["stdlib"], steps=args.steps
            )
        )
        prepare(load_config(recipe), log=lambda m: None)
        start = time.perf_counter()
        assert launch_training(recipe, root / "reference").wait() == 0
        reference_seconds = time.perf_counter() - start
        start = time.perf_counter()
        landed = train_with_kills(recipe, root / "killed", args.kills, args.seed)
        killed_seconds = time.perf_counter() - start
        want, _ = load_run_model(root / "reference")
        got, step = load_run_model(root / "killed")
        a, b = want.state_dict(), got.state_dict()
        identical = all(torch.equal(a[k], b[k]) for k in a)
        streams = [data_stream(root / "reference"), data_stream(root / "killed")]
    result = {
        "kills_landed": landed,
        "steps": args.steps,
        "final_step": step,
        "bit_identical_weights": identical,
        "same_data_stream": streams[0] == streams[1],
        "reference_seconds": reference_seconds,
        "with_kills_seconds": killed_seconds,
    }
    print(f"{landed} SIGKILLs landed over {args.steps} steps; final step {step}")
    print(f"weights bit-identical to the uninterrupted run: {identical}")
    print(f"same sequences consumed at every step: {streams[0] == streams[1]}")
    print(f"time: {reference_seconds:.1f} s uninterrupted, {killed_seconds:.1f} s with kills")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kill_resume.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'kill_resume.json'}")


if __name__ == "__main__":
    main()
