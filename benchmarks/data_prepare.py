"""Tokenization throughput (MB/s per core and with all workers) and the time to prepare a
recipe from scratch, then again with nothing changed.

    python benchmarks/data_prepare.py --config configs/tiny.toml --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from moegpt.config import load_config
from moegpt.data.prepare import prepare, tokenize
from moegpt.data.sources import load_corpus


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.config, {"data.data_dir": str(Path(tmp) / "data")})
        start = time.perf_counter()
        manifest = prepare(config, log=lambda message: None)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        prepare(config, log=lambda message: None)
        warm = time.perf_counter() - start
        tokenizer_path = Path(tmp) / "data" / "tokenizer.json"

        corpus = load_corpus(config.data.sources[0], 0)
        megabytes = sum(len(d.encode("utf-8")) for d in corpus.documents) / 1e6
        rows = {}
        for workers in sorted({1, cores}):
            start = time.perf_counter()
            tokenize(corpus.documents, tokenizer_path, workers, "benchmark")
            seconds = time.perf_counter() - start
            rows[workers] = {
                "seconds": seconds,
                "mb_per_s": megabytes / seconds,
                "mb_per_s_per_core": megabytes / seconds / workers,
            }

    tokens = sum(
        s["splits"]["train"]["tokens"] + s["splits"]["val"]["tokens"]
        for s in manifest["sources"].values()
    )
    print(f"{args.config} on {cores} cores ({platform.processor() or platform.machine()})")
    print(f"prepare from scratch: {cold:6.1f} s ({tokens:,} tokens, tokenizer training included)")
    print(f"prepare, nothing changed: {warm:6.2f} s")
    source = config.data.sources[0].name
    print(f"{'workers':>8} {'MB':>7} {'seconds':>8} {'MB/s':>7} {'MB/s/core':>10}  ({source})")
    for workers, row in rows.items():
        print(
            f"{workers:>8} {megabytes:7.1f} {row['seconds']:8.2f} {row['mb_per_s']:7.2f} "
            f"{row['mb_per_s_per_core']:10.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"data_prepare-{Path(args.config).stem}.json"
    path.write_text(
        json.dumps(
            {
                "config": args.config,
                "cores": cores,
                "prepare_seconds": cold,
                "prepare_nothing_changed_seconds": warm,
                "tokens": tokens,
                "source": config.data.sources[0].name,
                "source_mb": megabytes,
                "tokenize": {str(k): v for k, v in rows.items()},
            },
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
