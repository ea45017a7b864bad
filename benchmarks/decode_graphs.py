"""Decode steps through DecodeGraphs: CUDA-graph replay against the same step run eagerly.

Builds a config's model with random weights (bf16 on CUDA) and a paged cache filled with random
keys and values, then for each batch size and context: the logits of graph replay against the
eager block-table forward on the same inputs, and the median step time of each (synchronised
around every step, after warm-up), as decode tokens/s. Also times the capture of every bucket.

    python benchmarks/decode_graphs.py --config configs/small-moe.toml --out result.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import sdpa_kernel

from moegpt.config import ModelConfig, load_config
from moegpt.model import Transformer
from moegpt.serve.graphs import DecodeGraphs
from moegpt.serve.paged import (
    SDPA_BACKENDS,
    BlockTableStep,
    PagedKVCache,
    PagedStep,
    SequenceSlice,
    VarlenStep,
)
from moegpt.serve.table_rows import BlockTableRows

DEVICE = torch.device("cuda")


def step_inputs(tables: list[list[int]], q_len: int, context: int, block: int) -> dict:
    """A step of one sequence per block table, its last ``q_len`` tokens ending at
    ``context``."""
    positions = list(range(context - q_len, context))
    return dict(
        tokens=torch.randint(1000, (len(tables) * q_len,)).tolist(),
        positions=positions * len(tables),
        slot_mapping=[t[p // block] * block + p % block for t in tables for p in positions],
        block_tables=[t[: math.ceil(context / block)] for t in tables],
        context_lens=[context] * len(tables),
        q_len=q_len,
    )


def run_step(graphs: DecodeGraphs, step: dict) -> torch.Tensor:
    """``graphs.run`` on a step of :func:`step_inputs`, its tables padded to the bucket's
    window as the runner's :class:`BlockTableRows` gathers them."""
    tables = step["block_tables"]
    rows = BlockTableRows(fill=graphs.cache.scratch_block)
    rows.apply((row, 0, tuple(table)) for row, table in enumerate(tables))
    window = graphs.bucket(len(tables), step["q_len"], max(step["context_lens"]))[2]
    return graphs.run(
        step["tokens"],
        step["positions"],
        np.array(step["slot_mapping"]),
        rows.gather(np.arange(len(tables)), window),
        np.array(step["context_lens"]),
        step["q_len"],
    )


@torch.inference_mode()
def per_sequence_logits(model: Transformer, cache: PagedKVCache, step: dict) -> torch.Tensor:
    """The step through the batch-invariant path (each sequence attending alone)."""
    q_len, block = step["q_len"], cache.block_size
    sequences, slots = [], []
    for i, (table, context) in enumerate(
        zip(step["block_tables"], step["context_lens"], strict=True)
    ):
        sequences.append(SequenceSlice(i * q_len, q_len, context - q_len, len(slots)))
        slots += [table[p // block] * block + p % block for p in range(context)]
    new_slots = torch.tensor(step["slot_mapping"], device=cache.k.device)
    view = PagedStep(cache, torch.tensor(slots, device=new_slots.device), new_slots, sequences)
    tokens = torch.tensor([step["tokens"]], device=new_slots.device)
    positions = torch.tensor([step["positions"]], device=new_slots.device)
    with sdpa_kernel(SDPA_BACKENDS):
        return model(tokens, positions=positions, cache=view).logits[0].float()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def per_sequence_error(config: ModelConfig, block: int, q_lens: tuple[int, ...]) -> dict:
    """Relative error of the eager block-table step against the per-sequence path for 8
    sequences at a context of ``max_seq_len / 2``, in fp32: in bf16 a rounding difference flips
    some tokens' experts, so a random model's logits differ by tens of percent either way."""
    model = Transformer(config).to(DEVICE).eval()
    context = config.max_seq_len // 2
    per_sequence = math.ceil(context / block)
    cache = PagedKVCache(config, 8 * per_sequence, block, torch.float32, DEVICE, spare_block=True)
    cache.k.normal_()
    cache.v.normal_()
    order = torch.randperm(cache.num_blocks).tolist()
    tables = [order[i : i + per_sequence] for i in range(0, len(order), per_sequence)]
    graphs = DecodeGraphs(model, cache, 8, context, q_lens)
    errors = {}
    for q_len in q_lens:
        step = step_inputs(tables, q_len, context, block)
        want = per_sequence_logits(model, cache, step)
        errors[q_len] = relative_error(run_step(graphs, step).float(), want)
    return errors


def attention_error(config: ModelConfig, block: int, q_lens: tuple[int, ...]) -> dict:
    """Relative error of the block-table step's attention in bf16 (FlashAttention on CUDA)
    against the per-sequence path's in fp32 over the same keys, for 8 sequences of mixed
    lengths (the model-level check above runs SDPA: flash has no fp32)."""
    heads, kv_heads, d = config.n_heads, config.n_kv_heads, config.head_dim
    window = math.ceil(config.max_seq_len / block)
    cache = PagedKVCache(config, 8 * window, block, torch.bfloat16, DEVICE, spare_block=True)
    cache.k.normal_()
    cache.v.normal_()
    order = torch.randperm(cache.num_blocks).tolist()
    errors = {}
    for q_len in q_lens:
        contexts = torch.randint(q_len, config.max_seq_len + 1, (8,)).tolist()
        tables = [
            order[i * window : i * window + math.ceil(c / block)] for i, c in enumerate(contexts)
        ]
        new_slots = torch.tensor(
            [
                t[p // block] * block + p % block
                for t, c in zip(tables, contexts, strict=True)
                for p in range(c - q_len, c)
            ],
            device=DEVICE,
        )
        padded = [t + [cache.scratch_block] * (window - len(t)) for t in tables]
        # Token-major, as the model's projections lay heads out.
        q, k, v = (
            torch.randn(1, 8 * q_len, n, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
            for n in (heads, kv_heads, kv_heads)
        )
        reference = PagedKVCache(config, 8 * window, block, torch.float32, DEVICE, spare_block=True)
        reference.k.copy_(cache.k)
        reference.v.copy_(cache.v)
        fast = BlockTableStep(
            cache,
            new_slots,
            torch.tensor(padded, device=DEVICE),
            torch.tensor(contexts, device=DEVICE),
            q_len,
        )
        sequences, slots = [], []
        for i, (table, context) in enumerate(zip(tables, contexts, strict=True)):
            sequences.append(SequenceSlice(i * q_len, q_len, context - q_len, len(slots)))
            slots += [table[p // block] * block + p % block for p in range(context)]
        slow = PagedStep(reference, torch.tensor(slots, device=DEVICE), new_slots, sequences)
        with torch.inference_mode(), sdpa_kernel(SDPA_BACKENDS):
            got = fast.attend(0, q, k, v).float()
            want = slow.attend(0, q.float(), k.float(), v.float())
        errors[q_len] = relative_error(got, want)
    return errors


def varlen_attention_error(config: ModelConfig, block: int) -> float:
    """Relative error of the eager mixed step's attention (every sequence in one
    variable-length FlashAttention call, bf16) against the per-sequence path in fp32 over the
    same keys, for 8 sequences each running 1 to 64 new tokens after 0 to half a context."""
    window = math.ceil(config.max_seq_len / block)
    cache = PagedKVCache(config, 8 * window, block, torch.bfloat16, DEVICE)
    cache.k.normal_()
    cache.v.normal_()
    reference = PagedKVCache(config, 8 * window, block, torch.float32, DEVICE)
    reference.k.copy_(cache.k)
    reference.v.copy_(cache.v)
    order = torch.randperm(cache.num_blocks).tolist()
    news = torch.randint(1, 65, (8,)).tolist()
    pasts = torch.randint(0, config.max_seq_len // 2, (8,)).tolist()
    sequences, slots, new_slots, cu_q, cu_k = [], [], [], [0], [0]
    for i, (new, past) in enumerate(zip(news, pasts, strict=True)):
        table = order[i * window : (i + 1) * window]
        seq_slots = [table[p // block] * block + p % block for p in range(past + new)]
        sequences.append(SequenceSlice(cu_q[-1], new, past, len(slots)))
        slots += seq_slots
        new_slots += seq_slots[past:]
        cu_q.append(cu_q[-1] + new)
        cu_k.append(cu_k[-1] + past + new)
    longest = max(past + new for past, new in zip(pasts, news, strict=True))
    slots_at, new_at = (torch.tensor(v, device=DEVICE) for v in (slots, new_slots))
    cu_q_at, cu_k_at = (torch.tensor(v, device=DEVICE, dtype=torch.int32) for v in (cu_q, cu_k))
    fast = VarlenStep(cache, slots_at, new_at, cu_q_at, cu_k_at, max(news), longest)
    slow = PagedStep(reference, slots_at, new_at, sequences)
    q, k, v = (
        torch.randn(
            1, sum(news), n, config.head_dim, device=DEVICE, dtype=torch.bfloat16
        ).transpose(1, 2)
        for n in (config.n_heads, config.n_kv_heads, config.n_kv_heads)
    )
    with torch.inference_mode(), sdpa_kernel(SDPA_BACKENDS):
        got = fast.attend(0, q, k, v).float()
        want = slow.attend(0, q.float(), k.float(), v.float())
    return relative_error(got, want)


def kernel_profile(graphs: DecodeGraphs, step: dict) -> dict:
    """Kernels one eager step launches and their summed GPU time: what a replay runs."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run_step(graphs, step)
        torch.cuda.synchronize()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
    return dict(
        kernels=sum(e.count for e in ops),
        kernel_ms=sum(e.self_device_time_total for e in ops) / 1e3,
        top=[(e.key[:80], e.count, round(e.self_device_time_total)) for e in ops[:15]],
        # Every kernel, most launched first: what fusing would remove.
        launches=[
            (e.key[:120], e.count, round(e.self_device_time_total))
            for e in sorted(ops, key=lambda e: e.count, reverse=True)
        ],
    )


def median_ms(graphs: DecodeGraphs, inputs: dict, warmup: int, repeats: int) -> float:
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run_step(graphs, inputs)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/small-moe.toml")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument(
        "--contexts", default="256,512,2048", help="tokens per sequence, new included"
    )
    parser.add_argument("--lookahead", type=int, default=3, help="also check q_len 1 + this")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the step before capturing it"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    verify = 1 + args.lookahead

    torch.manual_seed(0)
    config = load_config(args.config).model
    reference_error = per_sequence_error(config, args.block_size, (1, verify))
    flash_error = attention_error(config, args.block_size, (1, verify))
    varlen_error = varlen_attention_error(config, args.block_size)
    model = Transformer(config).to(device=DEVICE, dtype=torch.bfloat16).eval()
    model.fuse_projections()  # as the engine does
    block = args.block_size
    per_sequence = math.ceil(config.max_seq_len / block)
    sequences = max(batches) + 8  # the verify step's 8 sequences come last
    cache = PagedKVCache(
        config, sequences * per_sequence, block, torch.bfloat16, DEVICE, spare_block=True
    )
    cache.k.normal_()
    cache.v.normal_()
    order = torch.randperm(cache.num_blocks).tolist()
    tables = [order[i : i + per_sequence] for i in range(0, len(order), per_sequence)]
    graphs = DecodeGraphs(
        model, cache, max(batches), config.max_seq_len, q_lens=(1, verify), compile=args.compile
    )

    # Both phases run the cases in the same order and a step rewrites its slots with the same
    # values each time, so each step sees the same cache in both.
    inputs = {(b, 1, c): step_inputs(tables[:b], 1, c, block) for c in contexts for b in batches}
    verify_case = (8, verify, max(contexts))
    inputs[verify_case] = step_inputs(tables[-8:], verify, max(contexts), block)
    cases = list(inputs)

    # Compiled, the first run of each shape compiles: that time counts as start-up, not here.
    compile_started = time.perf_counter()
    eager = {case: run_step(graphs, inputs[case]).float().clone() for case in cases}
    first_runs_s = time.perf_counter() - compile_started
    eager_ms = {case: median_ms(graphs, inputs[case], args.warmup, args.repeats) for case in cases}

    reserved = torch.cuda.memory_reserved()
    torch.cuda.synchronize()
    start = time.perf_counter()
    graphs.capture()
    torch.cuda.synchronize()
    capture_s = time.perf_counter() - start
    pool_mib = (torch.cuda.memory_reserved() - reserved) / 2**20

    rows = []
    for case in cases:
        batch, q_len, context = case
        got = run_step(graphs, inputs[case]).float()
        error = relative_error(got, eager[case])
        graph_ms = median_ms(graphs, inputs[case], args.warmup, args.repeats)
        rows.append(
            dict(
                batch=batch,
                q_len=q_len,
                context=context,
                bucket=graphs.bucket(batch, q_len, context),
                rel_error_vs_eager=error,
                eager_ms=eager_ms[case],
                graph_ms=graph_ms,
                eager_tok_s=batch * q_len / eager_ms[case] * 1e3,
                graph_tok_s=batch * q_len / graph_ms * 1e3,
            )
        )
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        python=platform.python_version(),
        config=args.config,
        compiled=args.compile,
        block_size=block,
        graphs=len(graphs.batch_sizes) * len(graphs.window_sizes) * len(graphs.q_lens),
        eager_vs_per_sequence_rel_error=reference_error,
        bf16_attention_vs_fp32_per_sequence_rel_error=flash_error,
        bf16_varlen_attention_vs_fp32_per_sequence_rel_error=varlen_error,
        first_runs_s=first_runs_s,
        capture_s=capture_s,
        graph_pool_mib=pool_mib,
        steps=rows,
    )
    # Last, on instances never captured (so they run eagerly) over the same model and cache.
    for case in ((1, 1, contexts[0]), (max(batches), 1, max(contexts))):
        profiled = DecodeGraphs(model, cache, case[0], config.max_seq_len, compile=args.compile)
        run_step(profiled, inputs[case])  # compiles, outside the profile
        result[f"batch_{case[0]}_context_{case[2]}_kernels"] = kernel_profile(
            profiled, inputs[case]
        )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(f"\n{len(rows)} cases, {result['graphs']} graphs captured in {capture_s:.1f} s")
    print("batch q_len context  eager tok/s  graph tok/s  speed-up  rel err")
    for r in rows:
        print(
            f"{r['batch']:5d} {r['q_len']:5d} {r['context']:7d} {r['eager_tok_s']:12.0f} "
            f"{r['graph_tok_s']:12.0f} {r['graph_tok_s'] / r['eager_tok_s']:9.2f} "
            f"{r['rel_error_vs_eager']:8.1e}"
        )
    print(f"fp32 eager block-table step vs per-sequence path, relative error: {reference_error}")
    print(f"bf16 block-table attention vs fp32 per-sequence path, relative error: {flash_error}")
    print(f"bf16 mixed-step (varlen) attention vs fp32 per-sequence path: {varlen_error:.1e}")
    print(f"batch 1: {result[f'batch_1_context_{contexts[0]}_kernels']['kernels']} kernels a step")
    if max(r["rel_error_vs_eager"] for r in rows) > 1e-2:  # the same kernels: 0 expected
        raise SystemExit("graph replay logits differ from the eager step's")
    if max(reference_error.values()) > 1e-4:  # fp32 rounding: about 1e-6
        raise SystemExit("the block-table step differs from the per-sequence path")
    if max(flash_error.values()) > 1e-2:  # bf16 probabilities: about 2e-3
        raise SystemExit("the bf16 block-table attention differs from the per-sequence path")
    if varlen_error > 1e-2:
        raise SystemExit("the bf16 mixed-step attention differs from the per-sequence path")


if __name__ == "__main__":
    main()
