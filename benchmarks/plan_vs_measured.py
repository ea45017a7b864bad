"""The planner's training memory and FLOPs against a measured training step.

For each case (micro-batch size, activation recomputation on/off) this builds the config's
model, wraps it as moegpt trains (FSDP2 on a one-rank mesh: fp32 master weights, bf16
compute, fp32 gradient reduction; AdamW), runs a few steps and compares:

- peak memory: ``torch.cuda.max_memory_allocated`` over steps after the first (so the
  optimizer states exist) against ``moegpt plan``'s estimate for the same layout;
- FLOPs: ``torch.utils.flop_counter`` over one forward + backward against the planner's
  FLOPs per token times the tokens. The counter charges attention the full T x T square
  (the planner counts the causal half), so the planner is also shown with full-T attention.

Prints a table and writes JSON into --out. On CPU (tiny shapes, to prove the script works)
memory is not measured.

    python benchmarks/plan_vs_measured.py --config configs/small-moe.toml --out benchmarks/results
    python benchmarks/plan_vs_measured.py --config configs/tiny.toml --device cpu \
        --micro-batches 2 --seq-len 64 --out /tmp/plan-check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from moegpt.config import load_config
from moegpt.model import Transformer
from moegpt.plan.flops import token_flops, training_token_flops
from moegpt.plan.memory import TrainLayout, training_memory

aten = torch.ops.aten


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of torch._grouped_mm, which the flop counter does not know: 2 x output x the
    contracted size, where a 3-D output (a weight gradient) splits its contraction by group."""
    if len(out_shape) == 3:
        return 2 * out_shape[1] * out_shape[2] * a_shape[-1]
    return 2 * out_shape[0] * out_shape[1] * a_shape[-1]


def _expand_kv(query_shape, key_shape, value_shape):
    """Key/value shapes with the query's head count: grouped-query attention broadcasts
    the K/V heads, and older flop counters (torch < 2.13) reject unequal head counts."""
    heads = query_shape[1]
    return (
        (key_shape[0], heads, *key_shape[2:]),
        (value_shape[0], heads, *value_shape[2:]),
    )


def sdpa_gqa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, *_expand_kv(query_shape, key_shape, value_shape))


def sdpa_gqa_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(
        grad_out_shape, query_shape, *_expand_kv(query_shape, key_shape, value_shape)
    )


SDPA_FLOPS = {
    op: sdpa_gqa_flops
    for op in (
        aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_cudnn_attention,
    )
} | {
    op: sdpa_gqa_backward_flops
    for op in (
        aten._scaled_dot_product_efficient_attention_backward,
        aten._scaled_dot_product_flash_attention_backward,
        aten._scaled_dot_product_cudnn_attention_backward,
    )
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(config, device: torch.device, recompute: bool) -> Transformer:
    torch.manual_seed(0)
    with device:
        model = Transformer(config.model)
    if recompute:
        for name, block in list(model.layers.items()):
            model.layers[name] = checkpoint_wrapper(block)
    mesh = init_device_mesh(device.type, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def loss_of(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens[:, :-1])
    logits = out.logits
    lm = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    return lm + out.aux_loss


def run_case(config, device, micro_batch: int, seq_len: int, recompute: bool, steps: int) -> dict:
    model = build(config, device, recompute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = config.model.vocab_size
    tokens = torch.randint(0, vocab, (micro_batch, seq_len + 1), device=device)
    cuda = device.type == "cuda"
    timings = []
    for step in range(steps):
        if cuda and step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss_of(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else None

    counter = FlopCounterMode(
        display=False, custom_mapping={aten._grouped_mm: grouped_mm_flops, **SDPA_FLOPS}
    )
    with counter:
        loss_of(model, tokens).backward()
    optimizer.zero_grad(set_to_none=True)
    measured_flops = counter.get_total_flops()

    hbm = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    layout = TrainLayout(
        dp=1,
        zero_stage=3,
        micro_batch=micro_batch,
        seq_len=seq_len,
        recompute=recompute,
        states="fsdp-fp32-master",
    )
    estimate = training_memory(config.model, layout, hbm)
    n_tokens = micro_batch * seq_len
    planned = training_token_flops(config.model, seq_len).training * n_tokens
    planned_full_t = token_flops(config.model, seq_len).training * n_tokens
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return {
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "recompute": recompute,
        "peak_allocated": peak,
        "planned_total": estimate.total,
        "planned": {k: v for k, v in vars(estimate).items() if isinstance(v, float)},
        "memory_ratio": estimate.total / peak if peak else None,
        "measured_flops": measured_flops,
        "planned_flops": planned,
        "planned_flops_full_t": planned_full_t,
        "flops_ratio_full_t": planned_full_t / measured_flops,
        "step_seconds": sorted(timings[1:])[len(timings[1:]) // 2] if steps > 1 else timings[0],
        "tokens_per_second": n_tokens / (sorted(timings[1:] or timings)[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/small-moe.toml")
    parser.add_argument("--micro-batches", default="4,8", help="comma-separated micro-batch sizes")
    parser.add_argument("--seq-len", type=int, help="default: the config's data.seq_len")
    parser.add_argument("--recompute", default="off,on", help="comma-separated on/off cases")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = parser.parse_args()

    config = load_config(args.config)
    seq_len = args.seq_len or config.data.seq_len
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        cases = [
            run_case(config, device, int(mb), seq_len, rc == "on", args.steps)
            for mb in args.micro_batches.split(",")
            for rc in args.recompute.split(",")
        ]
    finally:
        dist.destroy_process_group()

    name = Path(args.config).stem
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    header = (
        f"{'mb':>3} {'seq':>5} {'recomp':>6} {'measured GB':>11} {'planned GB':>10} {'ratio':>6} "
    )
    header += f"{'counted TFLOP':>13} {'planned(full T)':>15} {'ratio':>6} {'tok/s':>8}"
    print(f"{name} on {device_name}")
    print(header)
    for c in cases:
        measured = f"{c['peak_allocated'] / 1e9:11.2f}" if c["peak_allocated"] else f"{'n/a':>11}"
        ratio = f"{c['memory_ratio']:6.3f}" if c["memory_ratio"] else f"{'n/a':>6}"
        print(
            f"{c['micro_batch']:>3} {c['seq_len']:>5} {'on' if c['recompute'] else 'off':>6} "
            f"{measured} {c['planned_total'] / 1e9:10.2f} {ratio} "
            f"{c['measured_flops'] / 1e12:13.3f} {c['planned_flops_full_t'] / 1e12:15.3f} "
            f"{c['flops_ratio_full_t']:6.3f} {c['tokens_per_second']:8.0f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"plan_vs_measured-{name}-{device.type}.json"
    path.write_text(
        json.dumps(
            {
                "config": args.config,
                "device": device_name,
                "torch": torch.__version__,
                "cases": cases,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
