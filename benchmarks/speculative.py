"""Speculative decoding: speed-up and acceptance at batch 1, throughput under load.

Target and draft are exported folders (by default the quick-start model and a model trained
with configs/tiny-draft.toml). Prompts are the first `--prompt-len` tokens of standard-library
modules (code) and of pydoc topic pages (text), continued greedily for `--tokens` tokens.

1. batch 1: each prompt alone with no speculation, with prompt-lookup n-grams and with the
   draft (fixed lookahead and adaptive), tokens/s, speed-up, acceptance rate and accepted
   tokens per verification, per domain;
2. load: 1 to 64 concurrent requests (code and text mixed) without speculation and with
   adaptive speculation (draft and n-grams), throughput and the ratio to no speculation.

    python benchmarks/speculative.py                                   # CPU, trained tiny models
    python benchmarks/speculative.py --device cuda --dtype bfloat16 --out DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from moegpt.config import ServeConfig
from moegpt.serve.engine import Engine
from moegpt.serve.sequence import SamplingParams

CODE_MODULES = ("json/decoder.py", "argparse.py", "csv.py", "textwrap.py", "heapq.py", "bisect.py")


def prompts(engine: Engine, length: int) -> dict[str, list[list[int]]]:
    """Token prompts per domain, each cut to ``length`` tokens."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [(stdlib / m).read_text() for m in CODE_MODULES]
    text = [topics[k] for k in sorted(topics)[:: max(1, len(topics) // len(CODE_MODULES))]]
    cut = {
        d: [engine.encode(s)[:length] for s in docs] for d, docs in (("code", code), ("text", text))
    }
    return {d: [p for p in ps if len(p) == length][: len(CODE_MODULES)] for d, ps in cut.items()}


def run(engine: Engine, batch: list[list[int]], tokens: int) -> dict:
    engine.stats = type(engine.stats)()
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = engine.generate(batch, params)
    seconds = time.perf_counter() - start
    spec = engine.stats.spec
    return {
        "requests": len(batch),
        "tokens_per_second": sum(len(o[0].token_ids) for o in outs) / seconds,
        "acceptance_rate": spec.acceptance_rate,
        "accepted_per_verification": spec.mean_accepted,
        "acceptance_by_position": [
            a / p if p else 0.0 for a, p in zip(spec.accepted_at, spec.proposed_at, strict=True)
        ],
        "propose_share": engine.stats.propose_share,
        "outputs": [o[0].token_ids for o in outs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="runs/quickstart/export")
    parser.add_argument("--draft", default="runs/tiny-draft/export")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=3, help="runs per load level (median)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # Batch invariance is not what is measured here: every engine uses the device's fast path.
    methods = {
        "none": ServeConfig(speculation="off", decode_attention="padded"),
        "ngram fixed": ServeConfig(ngram=True, speculation="fixed"),
        "ngram adaptive": ServeConfig(ngram=True),
        "draft fixed": ServeConfig(draft=args.draft, speculation="fixed"),
        "draft adaptive": ServeConfig(draft=args.draft),
    }
    engines = {}
    for name, serve in methods.items():
        # Room for 64 sequences at full length; five engines share the device.
        blocks = 64 * -(-(args.prompt_len + args.tokens + 8) // serve.block_size)
        serve = ServeConfig(
            **{
                **serve.__dict__,
                "decode_attention": "padded",
                "max_batch_size": 64,
                "num_kv_blocks": blocks,
            }
        )
        engine = Engine.from_folder(args.target, serve, device=device)
        engine.model.to(dtype)
        if hasattr(engine.runner.proposer, "model"):  # a draft model
            engine.runner.proposer.model.to(dtype)
        engines[name] = engine
    data = prompts(engines["none"], args.prompt_len)
    for engine in engines.values():  # warm-up: first kernels, allocator, the cost refits
        run(engine, data["code"][:4], args.tokens)
    result: dict = {"target": args.target, "draft": args.draft, "dtype": args.dtype}
    result["device"] = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or "cpu")
    )
    batch1: dict = {}
    for domain, ps in data.items():
        for name, engine in engines.items():
            runs = [run(engine, [p], args.tokens) for p in ps]
            batch1[f"{domain}/{name}"] = {
                "tokens_per_second": sum(r["tokens_per_second"] for r in runs) / len(runs),
                "acceptance_rate": sum(r["acceptance_rate"] for r in runs) / len(runs),
                "accepted_per_verification": sum(r["accepted_per_verification"] for r in runs)
                / len(runs),
                "propose_share": sum(r["propose_share"] for r in runs) / len(runs),
                "outputs": [r["outputs"][0] for r in runs],
            }
        base = batch1[f"{domain}/none"]
        for name in engines:
            entry = batch1[f"{domain}/{name}"]
            entry["speedup"] = entry["tokens_per_second"] / base["tokens_per_second"]
            entry["same_output_as_none"] = entry["outputs"] == base["outputs"]
    for entry in batch1.values():
        del entry["outputs"]
    result["batch1"] = batch1

    mixed = [p for pair in zip(data["code"], data["text"], strict=False) for p in pair]
    load = []
    for c in [int(c) for c in args.concurrency.split(",")]:
        batch = [mixed[i % len(mixed)] for i in range(c)]
        row: dict = {"concurrency": c}
        names = ("none", "ngram adaptive", "draft adaptive")
        # Interleaved repeats, median: CPU timings here vary by +-15% from run to run.
        speeds: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                speeds[name].append(run(engines[name], batch, args.tokens)["tokens_per_second"])
        for name in names:
            row[name] = statistics.median(speeds[name])
        row["draft/none"] = row["draft adaptive"] / row["none"]
        row["ngram/none"] = row["ngram adaptive"] / row["none"]
        load.append(row)
    result["load"] = load

    print(f"target {args.target}, draft {args.draft} on {result['device']} ({args.dtype})")
    print(f"{'batch 1':<24} {'tokens/s':>9} {'speed-up':>9} {'accepted':>9} {'per verify':>11}")
    for key, e in batch1.items():
        print(
            f"{key:<24} {e['tokens_per_second']:9.1f} {e['speedup']:8.2f}x "
            f"{e['acceptance_rate']:9.0%} {e['accepted_per_verification']:11.2f}"
            + ("" if e["same_output_as_none"] else "  (output differs!)")
        )
    print(
        f"{'concurrent':>10} {'none':>9} {'ngram':>9} {'draft':>9} "
        f"{'ngram/none':>11} {'draft/none':>11}"
    )
    for r in load:
        print(
            f"{r['concurrency']:10d} {r['none']:9.1f} {r['ngram adaptive']:9.1f} "
            f"{r['draft adaptive']:9.1f} {r['ngram/none']:10.2f}x {r['draft/none']:10.2f}x"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speculative-tiny-{device.type}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
