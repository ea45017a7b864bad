"""The serving engine against Hugging Face `generate` with static batches, same weights.

One run measures, on one device:
1. batch-1 decode tokens/s against the memory-bandwidth roofline: the bytes one decode step
   must read (every weight a token touches: attention, norms, the router, its top-k experts,
   the output head, one embedding row, and the KV cache) over the device's measured copy
   bandwidth; and the bandwidth each decode step achieves (those bytes over the measured step
   time, and as a share of the copy bandwidth), for moegpt and for each Hugging Face variant.
   At B concurrent requests a step reads the weights once, the experts that any of the B
   tokens routes to (E(1 - (1 - k/E)^B) of E per layer, routing taken as uniform) and B
   requests' KV caches;
2. throughput, time to first token and time per output token (p50/p99) at each concurrency,
   all requests submitted at once, against HF `generate` on the same requests as one static
   batch (the weights converted with `moegpt convert`). Both sides are warmed up on the same
   shapes (same batch, prompt and output lengths) before timing, and each figure is the median
   of ``--repeats`` timed runs. Hugging Face runs in child processes, one variant each:
   `eager` (the default dynamic cache) and `static-compile` (``cache_implementation="static"``
   with ``model.forward = torch.compile(model.forward, mode="reduce-overhead",
   fullgraph=True)``, as HF's docs describe, and generate's own automatic compile turned off);
   `static-auto` (a static cache and generate's own automatic compile of the decode step, on
   CUDA only) on request. A variant that crashes or raises is reported at the concurrency
   where it did ("crashed (signal 11, SIGSEGV)", or its error line) and goes on with the rest,
   in a fresh process after a crash; one that runs out of its ``--hf-timeout`` (starts and
   compiles included; ``--budget`` caps the whole run) reports the rest as not run. Each
   variant compiles into a cache of its own. HF's time to first token is a timed
   ``max_new_tokens=1`` call; its decode step is (full call - that) / (output length - 1);
3. batch invariance in the run's dtype: greedy outputs of a mixed batch against a no-cache
   full-recompute reference (exact-match rate) and the largest difference of the reported
   top-5 log-probabilities from the reference's at the same positions;
4. the latency bound: the largest concurrency again with a time-per-output-token target
   (default twice the batch-1 step), with the steps over the target and why.

    python benchmarks/serve_vs_hf.py --config configs/small-moe.toml --out DIR      # GPU
    python benchmarks/serve_vs_hf.py --config configs/small-moe.toml --concurrency 1,64,256 \\
        --hf-variants eager,static-auto,static-compile --hf-timeout 200 --budget 490
    python benchmarks/serve_vs_hf.py --config configs/tiny.toml --device cpu \\
        --concurrency 1,4,16 --prompt-len 32 --output-len 16 --match-requests 8
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from moegpt.config import ServeConfig, load_config
from moegpt.convert import convert
from moegpt.model import Transformer
from moegpt.model.moe import GroupedExperts
from moegpt.serve.engine import Engine
from moegpt.serve.paged import bytes_per_token
from moegpt.serve.scheduler import mixed_step
from moegpt.serve.sequence import SamplingParams
from moegpt.serve.stats import EngineStats
from moegpt.weights import save_model

HF_VARIANTS = {
    "eager": "HF generate, dynamic cache, eager",
    "static-compile": 'HF generate, cache_implementation="static", forward torch.compile '
    '(mode="reduce-overhead", fullgraph=True)',
    "static-auto": 'HF generate, cache_implementation="static", generate\'s own automatic '
    "compile of the decode step (CUDA only)",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (a read and a write per byte)."""
    size = (1 << 30) if device.type == "cuda" else (1 << 28)
    x = torch.empty(size, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    return 2 * size * 10 / (time.perf_counter() - start)


def decode_bytes(model: Transformer, context: int, batch: int = 1) -> int:
    """Bytes one decode step of ``batch`` requests reads at ``context`` tokens of KV cache each.

    The experts read are those any of the ``batch`` tokens routes to: E(1 - (1 - k/E)^batch)
    of E in each layer on average, taking routing as uniform (k of E at batch 1, exactly).
    """
    config = model.config
    experts = {
        id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    }
    touched = 1 - (1 - config.top_k / config.n_experts) ** batch
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if id(p) in experts:
            size = size * touched
        elif name == "tok_embeddings.weight" and not config.tie_embeddings:
            size = p.shape[1] * p.element_size() * batch  # one row a token
        total += size
    dtype = next(model.parameters()).dtype
    return int(total) + batch * context * bytes_per_token(config, dtype)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def median_of(runs: list[dict]) -> dict:
    """Each numeric figure's median over repeated runs; the rest from the last run."""
    merged = dict(runs[-1])
    for key, value in runs[-1].items():
        if isinstance(value, float):
            merged[key] = statistics.median(r[key] for r in runs)
        elif isinstance(value, int) and not isinstance(value, bool):
            merged[key] = statistics.median_low(r[key] for r in runs)
    merged["repeats"] = len(runs)
    merged["tokens_per_second_each"] = [r["tokens_per_second"] for r in runs]
    return merged


def run_engine(engine: Engine, prompts: list[list[int]], output_len: int) -> dict:
    """Submit every prompt at once, run to completion; throughput and latency figures."""
    engine.stats = EngineStats()
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    device = engine.device
    sync(device)
    start = time.perf_counter()
    engine.generate(prompts, params)
    wall = time.perf_counter() - start
    stats = engine.stats
    steps = list(stats.step_seconds)
    return {
        "requests": len(prompts),
        "seconds": wall,
        "tokens_per_second": len(prompts) * output_len / wall,
        "ttft_p50_ms": percentile(list(stats.ttft_seconds), 0.5) * 1e3,
        "ttft_p99_ms": percentile(list(stats.ttft_seconds), 0.99) * 1e3,
        "tpot_p50_ms": percentile(list(stats.tpot_seconds), 0.5) * 1e3,
        "tpot_p99_ms": percentile(list(stats.tpot_seconds), 0.99) * 1e3,
        "step_p50_ms": percentile(steps, 0.5) * 1e3,
        "step_p99_ms": percentile(steps, 0.99) * 1e3,
        "steps": stats.steps,
        "preemptions": stats.preemptions,
        "bound_misses": dict(stats.bound_misses),
    }


TRACE_FIELDS = (
    "tokens",
    "keys",
    "sequences",
    "mixed",
    "predicted_ms",
    "measured_ms",
    "over_bound",
    "limited_by",
    "headroom",
    "banked_ms",
)


def trace_steps(engine: Engine) -> list[tuple]:
    """Record every step the engine's scheduler takes in from now on (``TRACE_FIELDS``): how
    the latency bound's decisions compare with what the steps then cost."""
    trace: list[tuple] = []
    scheduler = engine.scheduler
    update = scheduler.update

    def traced(out, result, seconds=None):
        predicted = None if out.predicted_s is None else out.predicted_s * 1e3
        row = (out.tokens, out.keys, len(out.chunks), int(mixed_step(out)), predicted)
        measured = None if seconds is None else seconds * 1e3
        state = (scheduler.headroom, scheduler.banked() * 1e3)
        trace.append((*row, measured, out.over_bound, out.limited_by, *state))
        return update(out, result, seconds)

    scheduler.update = traced
    return trace


def run_engine_warm(
    engine: Engine, prompts: list[list[int]], output_len: int, warmup: int, repeats: int
) -> dict:
    """``warmup`` untimed runs on the same requests, then the median of ``repeats`` runs."""
    for _ in range(warmup):
        run_engine(engine, prompts, output_len)
    return median_of([run_engine(engine, prompts, output_len) for _ in range(repeats)])


def batch_decode_1(engine: Engine, prompt: list[int], output_len: int) -> dict:
    """Decode tokens/s of one request after its prefill."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    engine.add_request(prompt, params)
    engine.step()  # prefill and the first token
    sync(engine.device)
    start = time.perf_counter()
    tokens = 0
    while engine.has_work():
        tokens += sum(len(o.token_ids) for o in engine.step())
    seconds = time.perf_counter() - start
    return {
        "tokens": tokens,
        "tokens_per_second": tokens / seconds,
        "step_ms": seconds / tokens * 1e3,
    }


def blocking_calls_per_step(engine: Engine, prompt: list[int], steps: int) -> float:
    """Synchronising CUDA calls (a blocking copy, ``.item()``, ...) per decode step, counted by
    torch's sync debug mode: an overlapped step should make none (it waits on events only),
    or the host stalls until the device drains and the overlap is lost."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    engine.add_request(prompt, params)
    engine.step()  # prefill and the first token
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while engine.has_work():
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


# Hugging Face, in a child process per variant -------------------------------------------------


def hf_worker(spec_path: Path) -> None:
    """Time one HF variant at each concurrency in the spec; one JSON line per event."""
    faulthandler.enable()  # a crash prints where it happened into the log
    spec = json.loads(spec_path.read_text())
    log = open(spec["results"], "a", buffering=1)  # noqa: SIM115 - lines must land at once

    def emit(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())

    import transformers
    from transformers import MixtralForCausalLM

    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    variant = spec["variant"]
    hf = MixtralForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(device).eval()
    warmup = spec["warmup"]
    if variant in ("static-compile", "static-auto"):
        hf.generation_config.cache_implementation = "static"
        warmup = max(warmup, 2)  # the compile, then the graph capture
    if variant == "static-compile":
        hf.generation_config.disable_compile = True  # one compile: the forward's own
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    emit(
        {
            "event": "loaded",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "attn_implementation": getattr(hf.config, "_attn_implementation", None),
            "experts_implementation": getattr(hf.config, "_experts_implementation", None),
        }
    )

    def generate(ids: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        sync(device)
        return time.perf_counter() - start, out

    output_len = spec["output_len"]
    for c in spec["concurrency"]:
        emit({"event": "start", "concurrency": c})
        ids = torch.tensor(spec["prompts"][:c], device=device)
        try:
            began = time.perf_counter()
            for _ in range(warmup):
                generate(ids, output_len)
                generate(ids, 1)
            warmup_seconds = time.perf_counter() - began
            full, first = [], []
            for _ in range(spec["repeats"]):
                seconds, out = generate(ids, output_len)
                full.append(seconds)
                first.append(generate(ids, 1)[0])
        except Exception as e:  # reported, and the next concurrency tried
            traceback.print_exc()
            line = next((s for s in str(e).splitlines() if s.strip()), "")
            emit({"event": "error", "concurrency": c, "error": f"{type(e).__name__}: {line}"})
            continue
        seconds, ttft = statistics.median(full), statistics.median(first)
        emit(
            {
                "event": "done",
                "concurrency": c,
                "requests": c,
                "seconds": seconds,
                "tokens_per_second": c * output_len / seconds,
                "ttft_ms": ttft * 1e3,
                "decode_step_ms": (seconds - ttft) / max(1, output_len - 1) * 1e3,
                "repeats": len(full),
                "warmup_seconds": warmup_seconds,  # compiles and captures included
                "tokens_per_second_each": [c * output_len / s for s in full],
                "first_request_tokens": out[0, ids.shape[1] :].tolist(),
            }
        )


def error_line(log: Path) -> str:
    """The last line of a child's log that names an error, else its last line."""
    lines = [s.strip() for s in log.read_text(errors="replace").splitlines() if s.strip()]
    named = [s for s in lines if "Error" in s or "Exception" in s or "error:" in s]
    return (named or lines or [""])[-1][:300]


def crash_site(log: Path) -> str:
    """The innermost Python frame of faulthandler's report in a child's log, if any."""
    lines = log.read_text(errors="replace").splitlines()
    heads = [i for i, s in enumerate(lines[:-1]) if "most recent call first" in s]
    current = [i for i in heads if "Current thread" in lines[i]]
    for i in current + heads:
        frame = lines[i + 1].strip()  # File "/.../x.py", line N in f
        if frame.startswith("File "):
            path, _, rest = frame.removeprefix("File ").partition(", line ")
            return f"{Path(path.strip(chr(34))).name}:{rest}"
    return ""


def run_hf_variant(variant: str, spec: dict, tmp: Path, timeout: float) -> dict:
    """Run ``variant`` in child processes; one record per concurrency, crashes included."""
    remaining = list(spec["concurrency"])
    records: dict[int, dict] = {}
    info: dict = {"variant": variant, "description": HF_VARIANTS[variant], "failures": []}
    # A compile cache of the variant's own: another variant's cached graphs (say, without CUDA
    # graphs) must not stand in for this one's, nor an earlier run's shorten its warm-up.
    caches = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
    env = {**os.environ, **{k: str(tmp / f"{v}-{variant}") for k, v in caches.items()}}
    began = time.monotonic()
    deadline = began + timeout
    attempt = 0
    while remaining:
        left = deadline - time.monotonic()
        if left <= 1:
            for c in remaining:
                records[c] = {"requests": c, "error": "not run: time budget spent"}
            break
        attempt += 1
        results, log = tmp / f"{variant}-{attempt}.jsonl", tmp / f"{variant}-{attempt}.log"
        spec_path = tmp / f"{variant}-{attempt}.spec.json"
        spec_path.write_text(
            json.dumps(
                {**spec, "variant": variant, "concurrency": remaining, "results": str(results)}
            )
        )
        with open(log, "w") as out:
            child = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--hf-worker", str(spec_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its compile workers go with it on a timeout
            )
            try:
                rc = child.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                rc = None
        events = []
        for line in results.read_text().splitlines() if results.exists() else []:
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
                events.append(json.loads(line))
        started = None
        for event in events:
            if event["event"] == "loaded":
                info.update({k: v for k, v in event.items() if k != "event"})
            elif event["event"] == "start":
                started = event["concurrency"]
            elif event["event"] in ("done", "error"):
                c = event.pop("concurrency")
                event.pop("event")
                records[c] = {"requests": c, **event}
                started = None
        if rc is None:
            reason = f"timed out ({timeout:.0f} s for this variant, starts and compiles included)"
        elif rc < 0:
            reason = f"crashed (signal {-rc}, {signal.Signals(-rc).name})"
            if site := crash_site(log):
                reason += f" at {site}"
        elif rc > 0:
            reason = error_line(log) or f"exit status {rc}"
        else:
            reason = None
        remaining = [c for c in remaining if c not in records]
        if reason is None:
            for c in remaining:  # a clean exit that skipped some: should not happen
                records[c] = {"requests": c, "error": "not run (the child exited early)"}
            break
        tail = log.read_text(errors="replace").splitlines()[-40:]
        info["failures"].append({"concurrency": started, "reason": reason, "log_tail": tail})
        print(f"HF {variant}: {reason} at concurrency {started}", file=sys.stderr)
        if started is None:  # before any concurrency began (the load): the same for all
            for c in remaining:
                records[c] = {"requests": c, "error": reason}
            break
        records[started] = {"requests": started, "error": reason}
        remaining = [c for c in remaining if c not in records]
        if rc is None:
            for c in remaining:
                records[c] = {"requests": c, "error": "not run: time budget spent"}
            break
    info["results"] = [records[c] for c in spec["concurrency"]]
    info["seconds"] = time.monotonic() - began  # children's starts, loads and compiles included
    return info


@torch.no_grad()
def invariance(engine: Engine, model: Transformer, prompts: list[list[int]], n: int) -> dict:
    """A mixed greedy batch against a no-cache full-recompute reference, request by request."""
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=5)
    outs = [c[0] for c in engine.generate(prompts, params)]
    exact, matched_tokens, largest = 0, 0, 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        reference, tokens = [], list(prompt)
        for _ in range(n):
            reference.append(
                int(model(torch.tensor([tokens], device=engine.device)).logits[0, -1].argmax())
            )
            tokens.append(reference[-1])
        exact += out.token_ids == reference
        matched_tokens += next(
            (i for i, (a, b) in enumerate(zip(out.token_ids, reference, strict=True)) if a != b), n
        )
        # The reference's log-probabilities along the engine's own tokens.
        path = torch.tensor([prompt + out.token_ids[:-1]], device=engine.device)
        logprobs = model(path).logits[0, len(prompt) - 1 :].float().log_softmax(-1)
        for row, entry in zip(logprobs, out.logprobs, strict=True):
            for token, value in entry["top"]:
                largest = max(largest, abs(float(row[token]) - value))
    return {
        "requests": len(prompts),
        "exact_match_rate": exact / len(prompts),
        "tokens_before_first_difference": matched_tokens / len(prompts),
        "largest_top5_logprob_difference": largest,
    }


def profile_steps(engine: Engine, prompts: list[list[int]], output_len: int, path: Path) -> None:
    """Kernel and host-op tables of decode steps at batch 1 and at len(prompts) requests."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    tables = []
    for batch in (prompts[:1], prompts):
        for prompt in batch:
            engine.add_request(prompt, params)
        while any(s.computed < len(s.prompt) for s in engine.scheduler.running) or (
            engine.scheduler.waiting
        ):
            engine.step()  # prefill everything first: the profile sees decode steps only
        with profile(activities=activities) as prof:
            for _ in range(5):
                engine.step()
        for key in ("self_cpu_time_total", "self_cuda_time_total"):
            if key == "self_cuda_time_total" and len(activities) == 1:
                continue
            table = prof.key_averages().table(sort_by=key, row_limit=25)
            tables.append(f"## {len(batch)} requests, 5 decode steps, by {key}\n{table}")
        for rid in list(engine._requests):
            engine.abort(rid)
    path.write_text("\n\n".join(tables))


def bandwidth_fields(nbytes: int, step_ms: float, copy: float) -> dict:
    achieved = nbytes / (step_ms / 1e3) if step_ms and step_ms > 0 else float("nan")
    return {
        "decode_bytes": nbytes,
        "achieved_gbs": achieved / 1e9,
        "achieved_fraction_of_copy": achieved / copy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/small-moe.toml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", default="1,4,16,64,256")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; medians reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs on the same shapes")
    parser.add_argument("--match-requests", type=int, default=32)
    parser.add_argument("--tpot-ms", type=float, help="latency target (default 2x batch-1 step)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile moegpt's decode step before capturing its graphs (serve.compile)",
    )
    parser.add_argument(
        "--hf-variants",
        default="eager,static-compile",
        help=f"comma-separated, of: {', '.join(HF_VARIANTS)}",
    )
    parser.add_argument(
        "--hf-timeout", type=float, default=900, help="seconds for each HF variant, all runs"
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole run: each HF variant gets at most what is left, less 15 s",
    )
    parser.add_argument("--profile", action="store_true", help="save profiler tables of steps")
    parser.add_argument(
        "--bound-trace",
        action="store_true",
        help="save every step of the latency-bound run (predicted and measured times, why)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--hf-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        hf_worker(args.hf_worker)
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    variants = [] if args.skip_hf else [v for v in args.hf_variants.split(",") if v]
    for v in variants:
        if v not in HF_VARIANTS:
            parser.error(f"unknown HF variant {v!r}; known: {', '.join(HF_VARIANTS)}")

    began = time.monotonic()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = load_config(args.config)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    torch.manual_seed(0)
    model = Transformer(config.model).to(device=device, dtype=dtype).eval()
    vocab, top = config.model.vocab_size, max(concurrency)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(vocab, (top, args.prompt_len), generator=gen).tolist()
    blocks_per_seq = -(-(args.prompt_len + args.output_len) // 16)
    serve = ServeConfig(
        max_batch_size=top, num_kv_blocks=top * blocks_per_seq + 64, compile=args.compile
    )
    engine = Engine(model, config=serve)
    result: dict = {"config": args.config, "dtype": str(dtype), "prompt_len": args.prompt_len}
    result["output_len"] = args.output_len
    result.update(repeats=args.repeats, warmup=args.warmup, statistic="median")
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    result["device"] = name
    result["torch"] = torch.__version__
    result["engine_setup"] = engine.describe()

    bandwidth = copy_bandwidth(device)
    context = args.prompt_len + args.output_len // 2  # the mean context of a decode step
    for _ in range(args.warmup):
        batch_decode_1(engine, prompts[0], args.output_len)
    runs = [batch_decode_1(engine, prompts[0], args.output_len) for _ in range(args.repeats)]
    one = median_of(runs)
    nbytes = decode_bytes(model, context)
    roofline = bandwidth / nbytes
    one.update(
        copy_bandwidth_gbs=bandwidth / 1e9,
        bytes_per_token=nbytes,
        roofline_tokens_per_second=roofline,
        fraction_of_roofline=one["tokens_per_second"] / roofline,
        **bandwidth_fields(nbytes, one["step_ms"], bandwidth),
    )
    if cuda:
        one["blocking_calls_per_step"] = blocking_calls_per_step(engine, prompts[0], 16)
    result["batch1"] = one

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        path = out / f"serve_profile-{Path(args.config).stem}-{device.type}.txt"
        profile_steps(engine, prompts, args.output_len, path)
    result["engine"] = []
    for c in concurrency:
        r = run_engine_warm(engine, prompts[:c], args.output_len, args.warmup, args.repeats)
        r.update(bandwidth_fields(decode_bytes(model, context, c), r["step_p50_ms"], bandwidth))
        result["engine"].append(r)
    mix = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, args.prompt_len + 1, (args.match_requests,), generator=mix)
    mixed = [torch.randint(vocab, (int(n),), generator=mix).tolist() for n in lengths]
    result["invariance"] = invariance(engine, model, mixed, min(32, args.output_len))

    target = args.tpot_ms or 2 * one["step_ms"]
    bounded = Engine(model, config=ServeConfig(**{**serve.__dict__, "tpot_ms": target}))
    del engine
    for _ in range(args.warmup):
        run_engine(bounded, prompts, args.output_len)
    trace = trace_steps(bounded) if args.bound_trace else None
    result["bound"] = {"tpot_target_ms": target, **run_engine(bounded, prompts, args.output_len)}
    if trace is not None:
        cost = bounded.scheduler.cost
        result["bound"]["cost_model"] = None if cost is None else dataclasses.asdict(cost)
        result["bound"]["trace_fields"] = list(TRACE_FIELDS)
        result["bound"]["trace"] = trace
    del bounded

    result["hf"] = {}
    if variants:
        if cuda:
            torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            save_model(model, tmp / "moegpt")
            convert(tmp / "moegpt", tmp / "hf")
            spec = {
                "model_dir": str(tmp / "hf"),
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "prompts": prompts,
                "concurrency": concurrency,
                "output_len": args.output_len,
                "warmup": args.warmup,
                "repeats": args.repeats,
            }
            for variant in variants:
                timeout = args.hf_timeout
                if args.budget:
                    timeout = min(timeout, args.budget - (time.monotonic() - began) - 15)
                info = run_hf_variant(variant, spec, tmp, max(0.0, timeout))
                for c, h in zip(concurrency, info["results"], strict=True):
                    if "decode_step_ms" in h:
                        nbytes = decode_bytes(model, context, c)
                        h.update(bandwidth_fields(nbytes, h["decode_step_ms"], bandwidth))
                result["hf"][variant] = info
        eager = result["hf"].get("eager")
        for info in result["hf"].values() if eager else []:  # greedy tokens against eager's
            for h, e in zip(info["results"], eager["results"], strict=True):
                a, b = h.get("first_request_tokens"), e.get("first_request_tokens")
                if a and b:
                    pairs = enumerate(zip(a, b, strict=True))
                    same = next((i for i, (x, y) in pairs if x != y), len(a))
                    h["tokens_before_first_difference_vs_eager"] = same

    stem = f"serve_vs_hf-{Path(args.config).stem}-{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    text = report(result, concurrency)
    print(text)
    (out / f"{stem}.txt").write_text(text + "\n")
    print(f"wrote {out / stem}.json and .txt")


def report(result: dict, concurrency: list[int]) -> str:
    """The plain-text tables of a run."""
    one = result["batch1"]
    lines = [
        f"{result['config']} on {result['device']} ({result['dtype']}, torch {result['torch']}), "
        f"prompts {result['prompt_len']}, outputs {result['output_len']}; median of "
        f"{result['repeats']} timed runs after {result['warmup']} warm-up run(s), both sides",
        f"moegpt engine: {result['engine_setup']}",
        f"copy bandwidth {one['copy_bandwidth_gbs']:,.0f} GB/s; a batch-1 decode step reads "
        f"{one['bytes_per_token'] / 1e6:,.1f} MB: roofline "
        f"{one['roofline_tokens_per_second']:,.1f} tokens/s",
        f"batch 1 decode, moegpt: {one['tokens_per_second']:,.1f} tokens/s, step "
        f"{one['step_ms']:.2f} ms, {one['achieved_gbs']:,.1f} GB/s achieved = "
        f"{one['achieved_fraction_of_copy']:.1%} of copy bandwidth (of the roofline)"
        + (
            f"; {one['blocking_calls_per_step']:.1f} blocking CUDA calls a step"
            if "blocking_calls_per_step" in one
            else ""
        ),
    ]
    for variant, info in result["hf"].items():
        h = info["results"][0]
        if h["requests"] == 1 and "decode_step_ms" in h:
            lines.append(
                f"batch 1 decode, HF {variant}: {1e3 / h['decode_step_ms']:,.1f} tokens/s, step "
                f"{h['decode_step_ms']:.2f} ms, {h['achieved_gbs']:,.1f} GB/s achieved = "
                f"{h['achieved_fraction_of_copy']:.1%} of copy bandwidth"
            )
    lines += [
        "",
        "moegpt engine (step p50: the median step; GB/s: bytes a decode step must read over it)",
        f"{'concurrent':>10} {'tokens/s':>10} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} "
        f"{'p99':>8} {'step p50':>9} {'GB/s':>7} {'% copy':>7}",
    ]
    for r in result["engine"]:
        lines.append(
            f"{r['requests']:10d} {r['tokens_per_second']:10,.1f} {r['ttft_p50_ms']:9.1f} "
            f"{r['ttft_p99_ms']:8.1f} {r['tpot_p50_ms']:9.2f} {r['tpot_p99_ms']:8.2f} "
            f"{r['step_p50_ms']:9.2f} {r['achieved_gbs']:7,.1f} "
            f"{r['achieved_fraction_of_copy']:7.1%}"
        )
    if result["hf"]:
        lines += [
            "",
            "Hugging Face generate, one static batch (TTFT: a max_new_tokens=1 call; decode "
            "step: the rest over output length - 1)",
            f"{'variant':>15} {'concurrent':>10} {'tokens/s':>10} {'TTFT':>8} {'step':>8} "
            f"{'GB/s':>7} {'% copy':>7} {'moegpt/HF':>10}",
        ]
    for variant, info in result["hf"].items():
        for r, h in zip(result["engine"], info["results"], strict=True):
            if "error" in h:
                lines.append(f"{variant:>15} {h['requests']:10d}   {h['error']}")
                continue
            lines.append(
                f"{variant:>15} {h['requests']:10d} {h['tokens_per_second']:10,.1f} "
                f"{h['ttft_ms']:8.1f} {h['decode_step_ms']:8.2f} {h['achieved_gbs']:7,.1f} "
                f"{h['achieved_fraction_of_copy']:7.1%} "
                f"{r['tokens_per_second'] / h['tokens_per_second']:9.2f}x"
            )
    for variant, info in result["hf"].items():
        for failure in info["failures"]:
            if failure["concurrency"] is None:
                lines.append(f"HF {variant}: {failure['reason']} (outside a concurrency's runs)")
    if result["hf"]:
        info = next(iter(result["hf"].values()))
        lines.append(
            f"(transformers {info.get('transformers')}, attention "
            f"{info.get('attn_implementation')}, experts {info.get('experts_implementation')})"
        )
    inv = result["invariance"]
    lines.append(
        f"invariance ({result['dtype']}): {inv['exact_match_rate']:.0%} of {inv['requests']} "
        f"requests exact, {inv['tokens_before_first_difference']:.1f} tokens before a difference "
        f"on average, largest top-5 logprob difference "
        f"{inv['largest_top5_logprob_difference']:.2e}"
    )
    b = result["bound"]
    over = sum(b["bound_misses"].values())
    lines.append(
        f"latency bound {b['tpot_target_ms']:.2f} ms at {b['requests']} concurrent: "
        f"{b['tokens_per_second']:,.1f} tokens/s, TPOT p50 {b['tpot_p50_ms']:.2f} "
        f"p99 {b['tpot_p99_ms']:.2f} ms, step p99 "
        f"{b['step_p99_ms']:.2f} ms, {over}/{b['steps']} steps over ({b['bound_misses']})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
