"""Instruction tuning on CPU: the quick-start model tuned on the standard-library instruction
set (configs/tiny-sft.toml), held-out exact match before and after.

    python benchmarks/instruct.py --out benchmarks/results

Uses a pretrained tiny export (--parent; trained and exported here if missing), prepares the
instruction set with the parent's tokenizer and chat template, asks the parent the held-out
questions, tunes it (--steps), asks again, and saves the table as JSON and text. Everything
goes through the `moegpt` verbs, as a user would run them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from verbs import exact_match_table, moegpt, save

RECIPE = "configs/tiny-sft.toml"


def ask(model: Path, overrides: list[str], limit: int) -> dict:
    args = ["eval", str(model), "--task", "instruct", "--config", RECIPE, "--json"]
    return json.loads(moegpt(*args, "--limit", str(limit), *overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/instruct", help="run directories go here")
    parser.add_argument("--parent", help="a pretrained tiny export (default: train one)")
    parser.add_argument("--steps", type=int, default=200, help="tuning steps (200)")
    parser.add_argument("--limit", type=int, default=300, help="held-out questions asked")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    runs = Path(args.runs)
    started = time.perf_counter()
    parent = Path(args.parent) if args.parent else runs / "tiny" / "export"
    if not (parent / "model.safetensors").is_file():
        moegpt("prepare", "--config", "configs/tiny.toml")
        moegpt("train", "--config", "configs/tiny.toml", "--run-dir", str(parent.parent))
        moegpt("export", str(parent.parent), str(parent))
    if not (parent / "tokenizer_config.json").is_file():  # exported before templates travelled
        raise SystemExit(f"{parent}: no chat template; re-export it with this version")
    data = [f"--data.tokenizer={parent / 'tokenizer.json'}", f"--train.init_from={parent}"]
    moegpt("prepare", "--config", RECIPE, *data)
    result = {"parent": str(parent), "before": ask(parent, [], args.limit)}
    run = runs / "tiny-sft"
    moegpt("train", "--config", RECIPE, "--run-dir", str(run), f"--train.steps={args.steps}", *data)
    moegpt("export", str(run), str(run / "export"))
    result["after"] = ask(run / "export", [], args.limit)
    result["steps"], result["seconds"] = args.steps, time.perf_counter() - started

    questions = result["after"]["by_kind"]["module"]["questions"]
    title = (
        f"tiny tuned {args.steps} steps on stdlib:instruct; exact match on held-out modules "
        f"({questions}+ questions a kind, greedy)"
    )
    table = exact_match_table(title, result["before"], result["after"])
    save(args.out, "instruct-tiny-cpu", result, table)


if __name__ == "__main__":
    main()
