"""The serving engine against Hugging Face `generate` with static batches, same weights.

One run measures, on one device:
1. batch-1 decode tokens/s against the memory-bandwidth roofline: the bytes one decode step
   must read (every weight a token touches: attention, norms, the router, its top-k experts,
   the output head, one embedding row, and the KV cache) over the device's measured copy
   bandwidth;
2. throughput, time to first token and time per output token (p50/p99) at each concurrency,
   all requests submitted at once, against HF `generate` on the same requests as one static
   batch (the weights converted with `moegpt convert`);
3. batch invariance in the run's dtype: greedy outputs of a mixed batch against a no-cache
   full-recompute reference (exact-match rate) and the largest difference of the reported
   top-5 log-probabilities from the reference's at the same positions;
4. the latency bound: the largest concurrency again with a time-per-output-token target
   (default twice the batch-1 step), with the steps over the target and why.

    python benchmarks/serve_vs_hf.py --config configs/small-moe.toml --out DIR      # GPU
    python benchmarks/serve_vs_hf.py --config configs/tiny.toml --device cpu \\
        --concurrency 1,4,16 --prompt-len 32 --output-len 16 --match-requests 8
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from moegpt.config import ServeConfig, load_config
from moegpt.convert import convert
from moegpt.model import Transformer
from moegpt.model.moe import GroupedExperts
from moegpt.serve.engine import Engine, EngineStats
from moegpt.serve.paged import bytes_per_token
from moegpt.serve.sequence import SamplingParams
from moegpt.weights import save_model


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


def decode_bytes(model: Transformer, context: int) -> int:
    """Bytes one batch-1 decode step reads at ``context`` tokens of KV cache."""
    config = model.config
    experts = {
        id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    }
    total = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if id(p) in experts:
            size = size * config.top_k // config.n_experts
        elif name == "tok_embeddings.weight" and not config.tie_embeddings:
            size = p.shape[1] * p.element_size()  # one row
        total += size
    dtype = next(model.parameters()).dtype
    return total + context * bytes_per_token(config, dtype)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


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


def run_hf(hf: torch.nn.Module, prompts: list[list[int]], output_len: int, device) -> dict:
    """One static batch through HF generate (equal prompt lengths: no padding)."""
    ids = torch.tensor(prompts, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
    sync(device)
    wall = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "seconds": wall,
        "tokens_per_second": len(prompts) * output_len / wall,
        "tpot_ms": wall / output_len * 1e3,  # every request waits for the whole batch
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/small-moe.toml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", default="1,4,16,64,256")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--match-requests", type=int, default=32)
    parser.add_argument("--tpot-ms", type=float, help="latency target (default 2x batch-1 step)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--profile", action="store_true", help="save profiler tables of steps")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

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
    serve = ServeConfig(max_batch_size=top, num_kv_blocks=top * blocks_per_seq + 64)
    engine = Engine(model, config=serve)
    result: dict = {"config": args.config, "dtype": str(dtype), "prompt_len": args.prompt_len}
    result["output_len"] = args.output_len
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    result["device"] = name

    bandwidth = copy_bandwidth(device)
    one = batch_decode_1(engine, prompts[0], args.output_len)
    context = args.prompt_len + args.output_len // 2
    roofline = bandwidth / decode_bytes(model, context)
    one.update(
        copy_bandwidth_gbs=bandwidth / 1e9,
        bytes_per_token=decode_bytes(model, context),
        roofline_tokens_per_second=roofline,
        fraction_of_roofline=one["tokens_per_second"] / roofline,
    )
    result["batch1"] = one

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        path = out / f"serve_profile-{Path(args.config).stem}-{device.type}.txt"
        profile_steps(engine, prompts, args.output_len, path)
    result["engine"] = [run_engine(engine, prompts[:c], args.output_len) for c in concurrency]
    mix = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, args.prompt_len + 1, (args.match_requests,), generator=mix)
    mixed = [torch.randint(vocab, (int(n),), generator=mix).tolist() for n in lengths]
    result["invariance"] = invariance(engine, model, mixed, min(32, args.output_len))

    target = args.tpot_ms or 2 * one["step_ms"]
    bounded = Engine(model, config=ServeConfig(**{**serve.__dict__, "tpot_ms": target}))
    del engine
    result["bound"] = {"tpot_target_ms": target, **run_engine(bounded, prompts, args.output_len)}
    del bounded

    if not args.skip_hf:
        from transformers import MixtralForCausalLM

        with tempfile.TemporaryDirectory() as tmp:
            save_model(model, Path(tmp) / "moegpt")
            convert(Path(tmp) / "moegpt", Path(tmp) / "hf")
            hf = MixtralForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=dtype)
        hf = hf.to(device).eval()
        result["hf"] = [run_hf(hf, prompts[:c], args.output_len, device) for c in concurrency]

    print(
        f"{args.config} on {name} ({dtype}), prompts {args.prompt_len}, outputs {args.output_len}"
    )
    print(
        f"batch 1 decode: {one['tokens_per_second']:,.1f} tokens/s, roofline "
        f"{roofline:,.1f} ({one['fraction_of_roofline']:.1%}; {bandwidth / 1e9:,.0f} GB/s copy, "
        f"{one['bytes_per_token'] / 1e6:,.1f} MB/token)"
    )
    print(
        f"{'concurrent':>10} {'tokens/s':>10} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} "
        f"{'p99':>8} {'HF tokens/s':>12} {'HF TPOT':>8} {'speed-up':>9}"
    )
    for i, r in enumerate(result["engine"]):
        h = result.get("hf", [None] * len(concurrency))[i]
        hf_cols = (
            f"{h['tokens_per_second']:12,.1f} {h['tpot_ms']:8.1f} "
            f"{r['tokens_per_second'] / h['tokens_per_second']:8.2f}x"
            if h
            else f"{'-':>12} {'-':>8} {'-':>9}"
        )
        print(
            f"{r['requests']:10d} {r['tokens_per_second']:10,.1f} {r['ttft_p50_ms']:9.1f} "
            f"{r['ttft_p99_ms']:8.1f} {r['tpot_p50_ms']:9.2f} {r['tpot_p99_ms']:8.2f} {hf_cols}"
        )
    inv = result["invariance"]
    print(
        f"invariance ({dtype}): {inv['exact_match_rate']:.0%} of {inv['requests']} requests "
        f"exact, {inv['tokens_before_first_difference']:.1f} tokens before a difference on "
        f"average, largest top-5 logprob difference {inv['largest_top5_logprob_difference']:.2e}"
    )
    b = result["bound"]
    over = sum(b["bound_misses"].values())
    print(
        f"latency bound {target:.2f} ms at {b['requests']} concurrent: "
        f"{b['tokens_per_second']:,.1f} tokens/s, TPOT p50 {b['tpot_p50_ms']:.2f} "
        f"p99 {b['tpot_p99_ms']:.2f} ms, step p99 "
        f"{b['step_p99_ms']:.2f} ms, {over}/{b['steps']} steps over ({b['bound_misses']})"
    )
    path = out / f"serve_vs_hf-{Path(args.config).stem}-{device.type}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
