"""SmolLM2-135M-Instruct tuned on the standard-library instruction set, on CPU: held-out exact
match before and after, with the recipe generated from the converted model's own config.

    python benchmarks/smollm2.py                       # converts the GGUF first
    python benchmarks/smollm2_sft.py --steps 60 --out benchmarks/results

The held-out modules are those of configs/tiny-sft.toml's split (same source, seed and
validation fraction), so the "before" figure is benchmarks/smollm2.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from verbs import exact_match_table, moegpt, save

from moegpt.config import Config, DataConfig, SourceConfig, TrainConfig, to_toml
from moegpt.weights import load_model_config


def recipe(model_dir: Path, work: Path, steps: int, lr: float) -> Path:
    """A tuning recipe whose [model] is the converted model's own."""
    source = SourceConfig(
        name="instruct", kind="chat", path="stdlib:instruct", epochs=1, val_fraction=0.1
    )
    config = Config(
        model=load_model_config(model_dir),
        data=DataConfig(
            seq_len=128,
            data_dir=str(work / "data"),
            tokenizer=str(model_dir / "tokenizer.json"),
            packing="documents",
            document_mask=True,
            sources=(source,),
        ),
        train=dataclasses.replace(
            TrainConfig(),
            init_from=str(model_dir),
            steps=steps,
            global_batch_size=8,
            micro_batch_size=4,
            lr=lr,
            warmup_steps=5,
            log_every=10,
            eval_every=steps,
            eval_batches=8,
        ),
    )
    path = work / "sft.toml"
    path.write_text(to_toml(config, with_help=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/smollm2", help="where smollm2.py converted it")
    parser.add_argument("--steps", type=int, default=60, help="tuning steps of 8 sequences")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--limit", type=int, default=100, help="held-out questions asked")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    work = Path(args.work)
    model_dir = work / "moegpt"
    if not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"{model_dir}: run benchmarks/smollm2.py first")
    started = time.perf_counter()
    config = recipe(model_dir, work, args.steps, args.lr)
    moegpt("prepare", "--config", str(config))
    run = work / "sft"
    moegpt("train", "--config", str(config), "--run-dir", str(run))
    moegpt("export", str(run), str(run / "export"), "--force")
    ask = ["--task", "instruct", "--config", "configs/tiny-sft.toml", "--json"]
    ask += ["--limit", str(args.limit)]
    result = {"steps": args.steps, "lr": args.lr, "batch": "8 x 128 tokens"}
    for name, folder in (("before", model_dir), ("after", run / "export")):
        result[name] = json.loads(moegpt("eval", str(folder), *ask))
    result["seconds"] = time.perf_counter() - started
    title = (
        f"SmolLM2-135M-Instruct tuned {args.steps} steps (8 x 128 tokens, lr {args.lr}) on "
        "stdlib:instruct; held-out exact match, greedy"
    )
    table = exact_match_table(title, result["before"], result["after"])
    save(args.out, "smollm2-sft-cpu", result, table)


if __name__ == "__main__":
    main()
