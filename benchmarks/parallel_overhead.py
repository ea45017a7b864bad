"""Overhead of the parallel wrappers at world size 1: the same training step on a plain model,
under FSDP2 on a one-rank mesh, and under DTensor tensor parallelism on a one-rank mesh.

Every variant runs the trainer's own pieces (``build_model``, ``build_optimizer``, the
layout's ``clip_grad_norm``) on the same random batch; the step time is the median after a
warm-up. Goal on one H100: the FSDP2 wrapper within 3% of the plain step.

    python benchmarks/parallel_overhead.py --config configs/small-moe.toml --out DIR
    python benchmarks/parallel_overhead.py --config configs/tiny.toml --device cpu \
        --steps 3 --seq-len 64 --micro-batch 2 --out /tmp/bench   # proves the script on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from train_vs_hf import time_steps

from moegpt.config import load_config
from moegpt.parallel.apply import clip_grad_norm
from moegpt.parallel.data import apply_fsdp
from moegpt.parallel.mesh import ParallelDims
from moegpt.parallel.tensor import apply_tensor_parallel
from moegpt.train.trainer import build_model, build_optimizer


def wrap(variant: str, model: torch.nn.Module, dims: ParallelDims, bf16: bool) -> None:
    if variant == "fsdp2":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None)
        apply_fsdp(model, dims, mp)
    elif variant == "tp":  # attention, dense layers, embedding and head as DTensors
        apply_tensor_parallel(model, dims["tp"])


class _Params:
    """A stand-in for a module: ``build_optimizer`` only reads ``parameters()``."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params

    def parameters(self):
        return iter(self.params)


def build_optimizers(model, config, device) -> list[torch.optim.Optimizer]:
    """The trainer's AdamW, one per kind of parameter: TP at world size 1 leaves norms, the
    router and the experts plain beside DTensor attention, and the fused kernel refuses a
    mixed list (plain and FSDP2 models get one optimizer, as in the trainer)."""
    params = list(model.parameters())
    kinds = [[p for p in params if isinstance(p, DTensor)]]
    kinds.append([p for p in params if not isinstance(p, DTensor)])
    return [build_optimizer(_Params(ps), config, device) for ps in kinds if ps]


def step_times(variant, config, dims, tokens, device, args) -> list[float]:
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    model = build_model(config, device)
    wrap(variant, model, dims, cuda)
    optimizers = build_optimizers(model, config, device)

    def step() -> None:
        with autocast:
            out = model(tokens[:, :-1])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        clip_grad_norm(model.parameters(), config.train.grad_clip, None)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return time_steps(step, args.steps, args.warmup, device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/small-moe.toml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, help="default: train.micro_batch_size")
    parser.add_argument("--seq-len", type=int, help="default: data.seq_len")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config = load_config(args.config, {"train.dtype": "bfloat16" if cuda else "float32"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    dims = ParallelDims.build(config.parallel, device)
    batch = args.micro_batch or config.train.micro_batch_size
    seq = args.seq_len or config.data.seq_len
    tokens = torch.randint(0, config.model.vocab_size, (batch, seq + 1), device=device)
    results = []
    for variant in ("plain", "fsdp2", "tp"):
        times = sorted(step_times(variant, config, dims, tokens, device, args))
        results.append({"variant": variant, "step_ms": times[len(times) // 2] * 1e3})
    base = results[0]["step_ms"]
    for r in results:
        r["overhead"] = r["step_ms"] / base - 1
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(f"{args.config}: batch {batch} x {seq} tokens on {name}, world size 1")
    print(f"{'variant':<10} {'step ms':>9} {'overhead':>9}")
    for r in results:
        print(f"{r['variant']:<10} {r['step_ms']:9.2f} {r['overhead']:9.1%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"parallel_overhead-{Path(args.config).stem}-{device.type}.json"
    path.write_text(
        json.dumps(
            {
                "config": args.config,
                "device": name,
                "batch": batch,
                "seq_len": seq,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
