"""Load generation against `moegpt serve` on loopback: Poisson arrivals of a mix of prompt and
output lengths, bounded in count and time. Reports throughput, time to first token and time
per output token (p50/p99, measured by the client from the stream), and the server's
latency-bound record from /metrics (steps over `--tpot-ms` and why).

    python benchmarks/serve_load.py --model runs/quickstart/export --requests 200 --rate 8 \\
        --tpot-ms 40                                       # starts the server itself
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --served-model-name NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPT_LENGTHS = ((16, 64), (128, 256))  # short and long prompts (characters x ~4)
OUTPUT_LENGTHS = ((16, 48), (64, 128))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "moegpt.cli", "serve", args.model, "--port", str(port)]
    command += ["--served-model-name", args.served_model_name]
    if args.tpot_ms:
        command += ["--tpot-ms", str(args.tpot_ms)]
    command += args.engine_args
    process = subprocess.Popen(command, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not come up")


def metrics(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    pairs = (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))
    return {name: float(value) for name, value in pairs}


async def one(http: httpx.AsyncClient, body: dict, sent: float) -> dict:
    """Stream one completion; the client-side latencies of each token chunk."""
    first = last = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    ttft = (first - sent) if first else float("nan")
    tpot = (last - first) / (tokens - 1) if first and tokens > 1 else float("nan")
    return {"ttft": ttft, "tpot": tpot, "tokens": tokens}


async def drive(args: argparse.Namespace, url: str, texts: list[str]) -> tuple[list[dict], float]:
    rng = random.Random(args.seed)
    results: list[asyncio.Task] = []
    limits = httpx.Limits(max_connections=args.requests)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=args.duration, limits=limits) as http:
        for _ in range(args.requests):
            if time.perf_counter() - start > args.duration:
                break
            low, high = rng.choice(PROMPT_LENGTHS)
            text = rng.choice(texts)
            at = rng.randrange(max(1, len(text) - 4 * high))
            body = {
                "model": args.served_model_name,
                "prompt": text[at : at + 4 * rng.randint(low, high)],
                "max_tokens": rng.randint(*rng.choice(OUTPUT_LENGTHS)),
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            results.append(asyncio.create_task(one(http, body, time.perf_counter())))
            await asyncio.sleep(rng.expovariate(args.rate))
        done = await asyncio.wait_for(asyncio.gather(*results), timeout=args.duration)
    return list(done), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="runs/quickstart/export", help="folder to serve")
    parser.add_argument("--url", help="an already running server (loopback) instead")
    parser.add_argument("--served-model-name", default="bench")
    parser.add_argument("--requests", type=int, default=200, help="at most this many")
    parser.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds, at most")
    parser.add_argument("--tpot-ms", type=float, default=0.0, help="the server's target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("engine_args", nargs="*", help="more `moegpt serve` flags (after --)")
    args = parser.parse_args()
    if args.url and not args.url.startswith(("http://127.", "http://localhost")):
        raise SystemExit("--url: loopback only")

    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / m).read_text() for m in ("argparse.py", "csv.py", "textwrap.py")]
    process, url = (None, args.url) if args.url else start_server(args)
    try:
        before = metrics(url)
        results, wall = asyncio.run(drive(args, url, texts))
        after = metrics(url)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] == r["ttft"]]
    tpot = [r["tpot"] for r in results if r["tpot"] == r["tpot"]]
    misses = {
        k.split('"')[1]: v - before.get(k, 0.0)
        for k, v in after.items()
        if k.startswith("moegpt_latency_bound_misses_total{")
    }
    steps = after["moegpt_steps_total"] - before["moegpt_steps_total"]
    summary = {
        "model": args.model if not args.url else args.url,
        "requests": len(results),
        "rate_per_s": args.rate,
        "tpot_target_ms": args.tpot_ms or None,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
        "ttft_p50_ms": percentile(ttft, 0.5) * 1e3,
        "ttft_p99_ms": percentile(ttft, 0.99) * 1e3,
        "tpot_p50_ms": percentile(tpot, 0.5) * 1e3,
        "tpot_p99_ms": percentile(tpot, 0.99) * 1e3,
        "steps": steps,
        "steps_over_target": misses,
    }
    print(
        f"{len(results)} requests at {args.rate}/s in {wall:.1f} s: "
        f"{summary['tokens_per_second']:,.1f} tokens/s"
    )
    print(
        f"TTFT p50 {summary['ttft_p50_ms']:.1f} ms, p99 {summary['ttft_p99_ms']:.1f} ms; "
        f"TPOT p50 {summary['tpot_p50_ms']:.2f} ms, p99 {summary['tpot_p99_ms']:.2f} ms"
    )
    if args.tpot_ms:
        over = sum(misses.values())
        print(
            f"latency bound {args.tpot_ms} ms: {over:.0f} of {steps:.0f} steps over "
            f"({', '.join(f'{k}: {v:.0f}' for k, v in misses.items()) or 'none'})"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve_load-{Path(args.model).parent.name or 'server'}-tpot{args.tpot_ms:g}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
