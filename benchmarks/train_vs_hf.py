"""Training throughput and MFU of moegpt against Hugging Face Mixtral, side by side.

Both models get the same shapes (from the config), the same batch of random token ids, AdamW,
and bf16 autocast on GPU; moegpt runs its training model (sorted dispatch, grouped GEMM
experts, optionally torch.compile), Mixtral runs in a minimal plain-PyTorch loop. MFU uses the
planner's training FLOPs per token over the device's dense bf16 peak. With --profile, the
top CUDA kernels of one moegpt step are saved too.

    python benchmarks/train_vs_hf.py --config configs/small-moe.toml --steps 200 --out DIR
    python benchmarks/train_vs_hf.py --config configs/tiny.toml --device cpu --steps 3 \
        --seq-len 64 --micro-batch 2 --out /tmp/bench      # proves the script on CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from moegpt.config import load_config
from moegpt.plan.flops import training_token_flops
from moegpt.train.metrics import device_peak_flops
from moegpt.train.trainer import build_model, build_optimizer, lm_loss_sum


def hf_mixtral(config, device: torch.device) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    m = config.model
    hf = MixtralConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.expert_hidden_size,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        num_local_experts=m.n_experts,
        num_experts_per_tok=m.top_k,
        max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps,
        output_router_logits=True,
        router_aux_loss_coef=m.aux_loss_coef / m.top_k,
        tie_word_embeddings=m.tie_embeddings,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(hf).to(device)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bench_moegpt(config, device, inputs, labels, autocast, args) -> list[float]:
    """Step times of moegpt's training model; with --profile, a kernel table too."""
    model = build_model(config, device)
    optimizer = build_optimizer(model, config, device)

    def step() -> None:
        with autocast:
            out = model(inputs)  # the trainer's own loss: fp32 chunked cross-entropy
            loss = lm_loss_sum(out.logits, labels) / labels.numel() + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_steps(step, args.steps, args.warmup, device)
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"train_profile-{Path(args.config).stem}.txt").write_text(table)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/small-moe.toml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, help="default: train.micro_batch_size")
    parser.add_argument("--seq-len", type=int, help="default: data.seq_len")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (GPU)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--profile", action="store_true", help="save a kernel table (GPU)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    overrides = {"train.compile": str(cuda and not args.no_compile)}
    if not cuda:
        overrides["train.dtype"] = "float32"
    config = load_config(args.config, overrides)
    batch = args.micro_batch or config.train.micro_batch_size
    seq = args.seq_len or config.data.seq_len
    tokens = torch.randint(0, config.model.vocab_size, (batch, seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    flops_per_token = training_token_flops(config.model, seq).training
    peak = device_peak_flops(device)
    results = []

    def report(name: str, times: list[float]) -> None:
        step = sorted(times)[len(times) // 2]
        tps = batch * seq / step
        results.append(
            {
                "impl": name,
                "step_ms": step * 1e3,
                "tokens_per_second": tps,
                "tflops": tps * flops_per_token / 1e12,
                "mfu": tps * flops_per_token / peak if peak else None,
                "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            }
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    report(
        "moegpt" + (" (compiled)" if config.train.compile else ""),
        bench_moegpt(config, device, inputs, labels, autocast, args),
    )

    if not args.skip_hf:
        hf = hf_mixtral(config, device)
        hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=config.train.lr, fused=cuda)

        def hf_step() -> None:
            with autocast:
                out = hf(input_ids=inputs, labels=tokens[:, 1:])
            out.loss.backward()
            hf_optimizer.step()
            hf_optimizer.zero_grad(set_to_none=True)

        report("HF MixtralForCausalLM", time_steps(hf_step, args.steps, args.warmup, device))

    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(f"{args.config}: batch {batch} x {seq} tokens on {name}")
    print(f"{'implementation':<24} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>7}")
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(
            f"{r['impl']:<24} {r['step_ms']:9.1f} {r['tokens_per_second']:11,.0f} "
            f"{r['tflops']:8.2f} {mfu:>7}"
        )
    if len(results) == 2:
        speedup = results[0]["tokens_per_second"] / results[1]["tokens_per_second"]
        print(f"moegpt / HF tokens/s: {speedup:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_vs_hf-{Path(args.config).stem}-{device.type}.json"
    path.write_text(
        json.dumps(
            {
                "config": args.config,
                "device": name,
                "batch": batch,
                "seq_len": seq,
                "peak_flops": peak,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
