"""The parallel layouts on several GPUs of one host (NCCL), in one call:

1. correctness: FSDP2, ZeRO-1, TP, PP (1F1B, interleaved), EP and TP x EP train `--steps`
   steps of a 4-layer MQA MoE on the prepared tiny corpus, in fp32 and bf16; losses and
   final parameters against the one-GPU run (fp32: losses within 1e-5 relative, parameters
   within 1e-4 in relative norm; bf16: no further from the fp32 one-GPU run than twice the
   bf16 one-GPU run is, see `bf16_within`);
2. planner agreement: each rank's parameter, gradient and optimizer bytes, and its peak
   memory, against `moegpt plan`'s per-GPU figures for the same layout;
3. scaling: tokens/s and MFU of `--scaling-config` at 1, 2, 4, 8 GPUs (or `--scaling-sizes`)
   for each of `--scaling-layouts`: FSDP2 alone, and FSDP2 with expert parallelism over the
   same ranks (or at most `--scaling-ep` of them); weak (batch grows with the GPUs) and strong
   (fixed global batch) scaling efficiency against one GPU, blocks compiled as the recipes
   train them (`--no-scaling-compile` for eager), and where a profiled multi-GPU step's
   time goes: all-to-all, NCCL kernels, NCCL with no compute beside it, the GPU idle;
4. context: context parallelism (ring attention) against one GPU, as in 1 (GPU only:
   PyTorch's ring attention runs on CUDA attention kernels);
5. serving: tokens/s of the serving engine at tensor-parallel sizes N = 1, 2, 4, 8 (or
   `--serving-tp`) on a random model of each `--serving-configs` recipe (`serve_tp.py`).

Multi-GPU hosts keep NVLink multicast off (NCCL_NVLS_ENABLE=0 and friends, set here for every
child). Every phase is one or a few torchrun jobs, and every one-GPU baseline runs in a child
process of its own (so no cached GPU memory stays in this one); the whole script fits ten
minutes on eight H200s. On a machine without GPUs it runs the same phases on gloo CPU ranks at tiny
shapes, to prove the script.

    PYTHONPATH=src python benchmarks/multi_gpu.py --out benchmarks/results   # all GPUs
    python benchmarks/multi_gpu.py --ranks 2 --phases correctness,planner \\
        --scaling-config configs/tiny.toml --serving-configs configs/tiny.toml --out /tmp/mg
    PYTHONPATH=src python benchmarks/multi_gpu.py --phases context --out DIR  # ring attention
    PYTHONPATH=src python benchmarks/multi_gpu.py --phases serving \\
        --serving-configs configs/small-moe.toml,configs/medium-moe.toml --out DIR
    PYTHONPATH=src python benchmarks/multi_gpu.py --phases serving --serving-tp 4 \\
        --serving-configs configs/large-moe.toml --out DIR    # 90 GB: four H100s
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from moegpt.config import ConfigError, load_config
from moegpt.data.tokenizer import load_tokenizer
from moegpt.parallel.launch import GPU_ENV_DEFAULTS
from moegpt.plan.memory import model_state_bytes, training_memory
from moegpt.plan.plan import PlanOptions, train_layout

BASE = ["--model.n_layers", "4", "--data.document_mask", "true", "--train.eval_batches", "2"]
BASE += ["--train.micro_batch_size", "2"]
PP = ["--parallel.pp", "2", "--parallel.pp_microbatches", "4"]


def base(ranks: int, steps: int) -> list[str]:
    """The correctness model, a batch every layout splits evenly (4 sequences a rank), and a
    schedule as long as the run."""
    return [*BASE, "--train.global_batch_size", str(4 * ranks), "--train.steps", str(steps)]


def layouts(ranks: int) -> dict[str, list[str]]:
    """The correctness layouts on ``ranks`` GPUs (TP and PP take 2, the rest the data
    dimension)."""
    dp = ["--parallel.dp_shard", str(ranks // 2)] if ranks > 2 else []
    out = {
        "fsdp2": ["--parallel.dp_shard", str(ranks)],
        "zero1": ["--parallel.dp_replicate", str(ranks), "--parallel.zero1", "true"],
        "tp2": ["--parallel.tp", "2", *dp],
        "pp2-1f1b": [*PP, "--parallel.pp_schedule", "1f1b", *dp],
        "pp2-interleaved": [*PP, "--parallel.pp_schedule", "interleaved_1f1b", *dp],
        "ep": ["--parallel.dp_shard", str(ranks), "--parallel.ep", str(min(ranks, 4))],
    }
    if ranks >= 4:
        out["tp2-ep2"] = ["--parallel.dp_shard", str(ranks // 2), "--parallel.ep", "2"]
        out["tp2-ep2"] += ["--parallel.tp", "2"]
    return out


# Ring attention runs causal attention only (no document mask); the switch load-balancing loss
# of a part of a sequence is not that of the whole, so exactness is checked without it (and
# reported with it).
CP_BASE = ["--data.document_mask", "false", "--model.aux_loss_coef", "0"]


def context_layouts(ranks: int) -> dict[str, list[str]]:
    """Context-parallel layouts on ``ranks`` GPUs: CP over all of them, and FSDP x CP2."""
    out = {f"cp{ranks}": ["--parallel.cp", str(ranks)]}
    if ranks >= 4:
        out["fsdp2-cp2"] = ["--parallel.dp_shard", str(ranks // 2), "--parallel.cp", "2"]
    return out


def env() -> dict[str, str]:
    return {**os.environ, **GPU_ENV_DEFAULTS, "PYTHONPATH": str(Path.cwd() / "src")}


def run_jobs(ranks: int, jobs: list[dict[str, Any]], root: Path, name: str) -> None:
    """Run ``jobs`` on ``ranks`` GPUs under torchrun; ranks 1 is one process without it (a
    child all the same, so a one-GPU baseline's cached memory never stays in this one)."""
    jobs_file = root / f"{name}.json"
    jobs_file.write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "moegpt.harness.jobs", str(jobs_file)]
    if ranks > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    done = subprocess.run(command, env=env(), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")


def job(recipe: Path, root: Path, name: str, overrides: list[str], steps: int, **extra) -> dict:
    return {
        "recipe": str(recipe),
        "overrides": overrides,
        "run_dir": str(root / "runs" / name),
        "steps": steps,
        "out": str(root / "out" / name),
        **extra,
    }


def read_record(root: Path, name: str) -> dict:
    """A job's record: losses, step times, memory, profile."""
    return json.loads((root / "out" / name).with_suffix(".json").read_text())


def read(root: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A job's record and its final parameters."""
    return read_record(root, name), load_file((root / "out" / name).with_suffix(".safetensors"))


def compare(a: tuple[dict, dict], b: tuple[dict, dict]) -> dict[str, float]:
    losses = max(abs(x - y) / abs(y) for x, y in zip(a[0]["losses"], b[0]["losses"], strict=True))
    diff = sum(float((a[1][k].float() - b[1][k].float()).norm() ** 2) for k in b[1])
    norm = sum(float(b[1][k].float().norm() ** 2) for k in b[1])
    return {"loss_rel": losses, "param_rel_norm": math.sqrt(diff / norm)}


# A bf16 layout reorders the same bf16 arithmetic (its reductions are split over ranks): it is
# one more rounding of the exact result, so its distance from the fp32 one-GPU run should be of
# the size of the bf16 one-GPU run's own. Twice that allows for the extra reduction level a
# layout adds (rounding errors of equal size add up to at most twice one of them); the floor
# covers runs where one GPU's bf16 happens to land almost on fp32.
BF16_FACTOR = 2.0


def bf16_within(versus_fp32: dict[str, float], one_gpu_versus_fp32: dict[str, float]) -> bool:
    """A bf16 run's distance from the fp32 one-GPU run, per measure, within ``BF16_FACTOR``
    times the bf16 one-GPU run's distance from it."""
    floor = {"loss_rel": 1e-5, "param_rel_norm": 1e-4}
    return all(versus_fp32[k] <= BF16_FACTOR * max(one_gpu_versus_fp32[k], floor[k]) for k in floor)


def heading(title: str, part: dict[str, Any]) -> str:
    """A report section's first line, with one GPU's bf16 distance from fp32 when measured."""
    bf16 = part.get("one_gpu_bf16_vs_fp32")
    if not bf16:
        return f"{title}:"
    return (
        f"{title} (one GPU's bf16 vs fp32: losses {bf16['loss_rel']:.1e}, params "
        f"{bf16['param_rel_norm']:.1e}):"
    )


def correctness(args, recipe: Path, root: Path, cuda: bool) -> dict[str, Any]:
    """Every layout against one process, per dtype: fp32 to rounding, bf16 by
    :func:`bf16_within` against the fp32 one-GPU run; plus the planner comparison's inputs."""
    dtypes = ["float32", "bfloat16"] if cuda else ["float32"]
    report: dict[str, Any] = {}
    for dtype in dtypes:
        extra = ["--train.dtype", dtype]
        runs = {n: base(args.ranks, args.steps) + o + extra for n, o in layouts(args.ranks).items()}
        run_jobs(
            args.ranks,
            [job(recipe, root, f"{dtype}-{n}", o, args.steps) for n, o in runs.items()],
            root,
            f"correctness-{dtype}",
        )
        single = job(
            recipe, root, f"{dtype}-single", base(args.ranks, args.steps) + extra, args.steps
        )
        run_jobs(1, [single], root, f"correctness-{dtype}-single")
        single = read(root, f"{dtype}-single")
        part: dict[str, Any] = {}
        if dtype == "bfloat16":  # the fp32 loop ran first: its one-GPU run is the truth
            truth = read(root, "float32-single")
            part["one_gpu_bf16_vs_fp32"] = compare(single, truth)
        rows = {}
        for name, overrides in runs.items():
            result = read(root, f"{dtype}-{name}")
            row = compare(result, single)
            if dtype == "float32":
                row["pass"] = row["loss_rel"] <= 1e-5 and row["param_rel_norm"] <= 1e-4
            else:
                row["vs_fp32"] = compare(result, truth)
                row["pass"] = bf16_within(row["vs_fp32"], part["one_gpu_bf16_vs_fp32"])
            row["planner"] = planner_agreement(recipe, overrides, result[0]["ranks"], cuda)
            rows[name] = row
        report[dtype] = {**part, "layouts": rows}
    return report


def context(args, recipe: Path, root: Path) -> dict[str, Any]:
    """Context parallelism against one GPU at the same settings, per dtype. fp32: exact
    bounds. bf16, where the ring's chunked softmax rounds differently from one kernel call:
    both runs against one fp32 GPU run, the ring's error no more than twice one GPU's. Each
    without the load-balancing loss (exact), and the difference with it reported."""
    report: dict[str, Any] = {}
    # Grouped K/V heads (the recipe's MQA) ring-attend in bf16 only (config.py says why): the
    # fp32 check gives the model one K/V head per query head.
    heads = str(load_config(recipe).model.n_heads)
    variants = [(d, d == "float32") for d in args.context_dtypes.split(",")]
    if args.context_mha and "bfloat16" in args.context_dtypes.split(","):
        variants.append(("bfloat16", True))  # tells the ring's bf16 rounding from the MQA path
    for dtype, one_kv_per_query in variants:
        mha = ["--model.n_kv_heads", heads] if one_kv_per_query else []
        for aux in ("off", "on"):
            common = [*base(args.ranks, args.steps), *mha, "--train.dtype", dtype]
            common += CP_BASE if aux == "off" else CP_BASE[:2]
            runs = {n: common + o for n, o in context_layouts(args.ranks).items()}
            tag = f"cp-{dtype}{'-mha' if one_kv_per_query else ''}-aux-{aux}"
            jobs = [job(recipe, root, f"{tag}-{n}", o, args.steps) for n, o in runs.items()]
            run_jobs(args.ranks, jobs, root, tag)
            run_jobs(1, [job(recipe, root, f"{tag}-single", common, args.steps)], root, f"{tag}-1")
            single = read(root, f"{tag}-single")
            truth = single
            part: dict[str, Any] = {}
            if dtype == "bfloat16":
                fp32 = [*common, "--train.dtype", "float32"]
                run_jobs(1, [job(recipe, root, f"{tag}-fp32", fp32, args.steps)], root, f"{tag}-f")
                truth = read(root, f"{tag}-fp32")
                part["one_gpu_bf16_vs_fp32"] = compare(single, truth)
            rows = {}
            for name in runs:
                result = read(root, f"{tag}-{name}")
                row = compare(result, single)
                if dtype == "bfloat16":
                    row["vs_fp32"] = compare(result, truth)
                    exact = bf16_within(row["vs_fp32"], part["one_gpu_bf16_vs_fp32"])
                else:
                    exact = row["loss_rel"] <= 1e-5 and row["param_rel_norm"] <= 1e-4
                if aux == "off":
                    row["pass"] = exact
                rows[name] = row
            part["layouts"] = rows
            heads_note = ", one K/V head per query head" if one_kv_per_query else ""
            report[f"{dtype}{heads_note}, load-balancing loss {aux}"] = part
    return report


def planner_agreement(recipe: Path, overrides: list[str], ranks: list[dict], cuda: bool) -> dict:
    """Measured state bytes (and peak memory on GPU) of the most loaded rank against the
    plan for the same layout."""
    config = load_config(recipe, overrides)
    layout, _ = train_layout(config, PlanOptions())
    stages = model_state_bytes(config.model, layout)
    planned = max(s.weights + s.grads + s.optimizer for s in stages)
    measured = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
    out = {"state_bytes_measured": measured, "state_bytes_planned": planned}
    out["state_error"] = measured / planned - 1
    if cuda:
        peak = max(r.get("peak_allocated", 0) for r in ranks)
        plan = training_memory(config.model, layout, 80e9).total
        out |= {"peak_measured": peak, "peak_planned": plan, "peak_error": peak / plan - 1}
    return out


LAYOUT_NAME = re.compile(r"fsdp(-ep(\d*))?")


def scaling_layouts(names: list[str], n: int, n_experts: int, most_ep: int) -> dict[str, list[str]]:
    """The named layouts of ``n`` GPUs the scaling phase times: ``fsdp`` shards every weight
    over all of them (each rank runs every expert on its own tokens); ``fsdp-ep`` also puts
    each expert on ``n`` ranks (or ``most_ep``) and sends tokens to them (all-to-all), and
    ``fsdp-epK`` on K of them (the all-to-all among fewer ranks; skipped where K exceeds
    ``n``)."""
    out = {}
    for name in names:
        match = LAYOUT_NAME.fullmatch(name)
        assert match, name  # checked when the arguments were read
        if match[1] is None:
            out[name] = ["--parallel.dp_shard", str(n)]
        elif not n_experts:
            print(f"  {name}: skipped, the scaling config has no experts", flush=True)
        elif match[2] and int(match[2]) > n:
            print(f"  {name}: skipped at {n} GPUs", flush=True)
        else:
            ep = int(match[2]) if match[2] else min(n, n_experts, most_ep or n)
            out[name] = ["--parallel.dp_shard", str(n), "--parallel.ep", str(ep)]
    return out


# A profiled step's shares (moegpt.harness.jobs.communication_profile) kept in each row.
PROFILE_SHARES = (
    "all_to_all_share",
    "communication_share",
    "exposed_communication_share",
    "idle_share",
)


def scaling(args, root: Path, sizes: list[int], top: int, tag: str) -> list[dict[str, Any]]:
    """Weak and strong scaling of the scaling config for each layout of ``--scaling-layouts``,
    each against the same one-GPU run; the compile setting is the same for every run. Strong
    scaling keeps the global batch of ``top`` GPUs (the machine's largest size), so that
    calls which split the sizes between them measure the same thing."""
    config = load_config(args.scaling_config)
    micro = config.train.micro_batch_size
    rows = []
    for n in [1, *[m for m in sizes if m > 1]]:
        names = args.scaling_layouts.split(",")
        runs = (
            {"one GPU": []}
            if n == 1
            else scaling_layouts(names, n, config.model.n_experts, args.scaling_ep)
        )
        for name, layout in runs.items():
            common = [*layout, "--train.compile", str(args.scaling_compile).lower()]
            common += [f"--{setting}" for setting in args.scaling_set]
            common += ["--train.warmup_steps", "1", "--train.steps", str(args.scaling_steps + 1)]
            weak = [*common, "--train.global_batch_size", str(n * micro)]
            strong = [*common, "--train.global_batch_size", str(top * micro)]
            tag = f"{n}-{name.replace(' ', '-')}"
            recipe = Path(args.scaling_config)
            jobs = [
                job(recipe, root, f"weak-{tag}", weak, args.scaling_steps, profile=n > 1),
                job(recipe, root, f"strong-{tag}", strong, args.scaling_steps),
            ]
            for timed in jobs:
                timed["timing"] = True
            run_jobs(n, jobs, root, f"scaling-{tag}")
            row: dict[str, Any] = {"gpus": n, "layout": name, "overrides": " ".join(layout)}
            for kind in ("weak", "strong"):
                record = read_record(root, f"{kind}-{tag}")
                settled = record["tokens_per_second"][args.scaling_steps // 2 :]
                row[f"{kind}_tokens_per_second"] = sorted(settled)[len(settled) // 2]
                mfu = [m for m in record["mfu"][args.scaling_steps // 2 :] if m is not None]
                row[f"{kind}_mfu"] = sorted(mfu)[len(mfu) // 2] if mfu else None
                if kind == "weak":
                    row |= {share: record.get(share) for share in PROFILE_SHARES}
            base = rows[0] if rows else row
            for kind in ("weak", "strong"):
                row[f"{kind}_efficiency"] = row[f"{kind}_tokens_per_second"] / (
                    n * base[f"{kind}_tokens_per_second"]
                )
            rows.append(row)
            print(f"  scaling at {n} GPUs, {name}: {row}", flush=True)
            # A later size may outrun the caller's time limit: keep what was measured.
            partial = Path(args.out) / f"multi_gpu-scaling-partial{tag}.json"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(rows, indent=2, default=str))
    return rows


def profile_note(row: dict[str, Any]) -> str:
    """A scaling row's profiled step in words (empty for the unprofiled one-GPU row)."""
    if row.get("all_to_all_share") is None:
        return ""
    note = f"; profiled step: all-to-all {row['all_to_all_share']:.1%} of kernel time"
    if row.get("communication_share") is not None:
        note += (
            f", NCCL running {row['communication_share']:.1%} of the step, "
            f"{row['exposed_communication_share']:.1%} with no compute beside it, "
            f"GPU idle {row['idle_share']:.1%}"
        )
    return note


def random_model_folder(config_path: str, vocab: int, tokenizer: Path, folder: Path) -> Path:
    """An exported folder of ``config_path``'s model with random weights. On a GPU they are
    drawn there in bf16 (large-moe's 45B on the host's cores took longer than a call may
    run), and the GPU's memory is handed back before the TP ranks start on it."""
    from moegpt.model import Transformer
    from moegpt.weights import save_model

    config = load_config(config_path, ["--model.vocab_size", str(vocab)])
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("meta"):  # no memory until each tensor lands in its final dtype
        model = Transformer(config.model).to(torch.bfloat16 if cuda else torch.float32)
    model = model.to_empty(device="cuda" if cuda else "cpu")
    model.reset_parameters()
    saved = save_model(model, folder, extra_files={"tokenizer.json": tokenizer})
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return saved


def serving(args, root: Path, sizes: list[int]) -> list[dict[str, Any]]:
    """Decode rates of the serving engine at each N of `--serving-tp` the recipe's heads
    divide, for each `--serving-configs` model (random weights): `serve_tp.py` under torchrun,
    batch 1 and 32, warmed up, the median of three runs."""
    # The prepared corpus's tokenizer gives the engine text in and out (its vocabulary
    # replaces the config's).
    tokenizer = Path(load_config(args.recipe).data.data_dir) / "tokenizer.json"
    vocab = load_tokenizer(tokenizer).get_vocab_size()
    tps = [int(n) for n in args.serving_tp.split(",")] if args.serving_tp else sizes
    script = Path(__file__).with_name("serve_tp.py")
    rows = []
    for config_path in args.serving_configs.split(","):
        name = Path(config_path).stem
        started = time.perf_counter()
        folder = random_model_folder(config_path, vocab, tokenizer, root / f"serving-{name}")
        made = time.perf_counter() - started
        heads = load_config(config_path).model.n_heads
        runs = [(n, False) for n in tps if heads % n == 0]
        runs += [(n, True) for n, _ in runs if n > 1 and args.serving_symmetric_too]
        for n, custom in runs:
            row: dict[str, Any] = {"config": name, "tp": n, "model_seconds": made}
            row["custom_all_reduce"] = custom  # also when the run fails
            out = root / f"serving-{name}-tp{n}{'-symmetric' if custom else ''}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += [f"--nproc-per-node={n}", str(script), str(folder), "--tp", str(n)]
            command += ["--out", str(out)]
            command += ["--compile" if args.serving_compile else "--no-compile"]
            command += ["--custom-all-reduce" if custom else "--no-custom-all-reduce"]
            # Weights written moments ago by this process: hashing them again (90 GB for
            # large-moe) would only lengthen the run. Their size is still checked.
            command += ["--no-verify-weights"]
            began = time.perf_counter()
            try:
                done = subprocess.run(
                    command, env=env(), capture_output=True, text=True, timeout=args.serving_timeout
                )
                if done.returncode:
                    row["error"] = done.stderr.strip().splitlines()[-3:]
                else:
                    row.update(json.loads(out.read_text()))
            except subprocess.TimeoutExpired as e:  # keep its output: where it stalled
                err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
                row["error"] = [f"timed out after {args.serving_timeout} s"]
                row["stderr_tail"] = err[-6000:]
            row["wall_seconds"] = time.perf_counter() - began
            rows.append(row)
            print(f"  serving {name} tp {n}{' (symmetric)' if custom else ''}: {row}", flush=True)
            # A later run may stall past the caller's time limit: keep what was measured.
            partial = Path(args.out) / "multi_gpu-serving-partial.json"
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(rows, indent=2, default=str))
        shutil.rmtree(folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    gpus = torch.cuda.device_count()
    parser.add_argument("--ranks", type=int, default=gpus or 2, help="GPUs (or CPU ranks)")
    parser.add_argument("--phases", default="correctness,scaling,serving")
    parser.add_argument("--recipe", default="configs/tiny.toml", help="correctness model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scaling-config", default="configs/small-moe.toml")
    parser.add_argument("--scaling-steps", type=int, default=12)
    parser.add_argument(
        "--scaling-ep",
        type=int,
        default=0,
        help="most expert-parallel ranks in the scaling phase (default: every GPU); FSDP2 "
        "still shards over all of them, so a smaller EP keeps the all-to-all among fewer",
    )
    parser.add_argument(
        "--scaling-layouts",
        default="fsdp,fsdp-ep",
        help="comma-separated layouts the scaling phase times at each size: fsdp (FSDP2 over "
        "every GPU), fsdp-ep (FSDP2 with expert parallelism over every GPU, or --scaling-ep) "
        "and fsdp-epK (expert parallelism over K of them)",
    )
    parser.add_argument(
        "--scaling-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config setting for every run of the scaling phase (repeatable), e.g. "
        "parallel.reduce_dtype=bfloat16",
    )
    parser.add_argument(
        "--scaling-sizes",
        help="comma-separated GPU counts the scaling phase runs (default 1, 2, 4, 8 <= ranks; "
        "the one-GPU baseline always runs), to split the phase over several calls",
    )
    parser.add_argument(
        "--scaling-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile each block, as the recipes train (every run, the baseline too)",
    )
    parser.add_argument(
        "--serving-configs", default="configs/small-moe.toml", help="comma-separated recipes"
    )
    parser.add_argument("--serving-tp", help="tensor-parallel sizes (default 1, 2, 4, 8 <= ranks)")
    parser.add_argument(
        "--serving-timeout", type=float, default=300.0, help="seconds one TP size's run may take"
    )
    parser.add_argument(
        "--serving-symmetric-too",
        action="store_true",
        help="run each TP size > 1 a second time with small sums through symmetric memory "
        "(serve.custom_all_reduce = true), for comparison",
    )
    parser.add_argument(
        "--serving-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile the decode step before capturing its graphs (each run compiles afresh)",
    )
    parser.add_argument(
        "--context-dtypes", default="float32,bfloat16", help="dtypes the context phase checks"
    )
    parser.add_argument(
        "--context-mha",
        action="store_true",
        help="also check bf16 with one K/V head per query head (fp32 always has it)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    args.device = "cuda" if gpus else "cpu"
    cuda = args.device == "cuda"
    phases = set(args.phases.split(","))
    sizes = [n for n in (1, 2, 4, 8) if n <= args.ranks]
    # The phase's settings are checked before anything runs (the baseline takes minutes).
    layout_names = args.scaling_layouts.split(",")
    try:
        scaled = load_config(args.scaling_config, [f"--{s}" for s in args.scaling_set]).model
    except ConfigError as error:
        parser.error(f"--scaling-set: {error}")
    unknown = sorted(name for name in layout_names if not LAYOUT_NAME.fullmatch(name))
    if unknown:
        parser.error(
            f"--scaling-layouts: unknown layout(s) {', '.join(unknown)} (fsdp, fsdp-ep, fsdp-epK)"
        )
    uneven = [
        name
        for name in layout_names
        if (k := LAYOUT_NAME.fullmatch(name)[2])
        and (int(k) < 2 or max(sizes) % int(k) or scaled.n_experts % int(k))
    ]
    if uneven:
        parser.error(
            f"--scaling-layouts: {', '.join(uneven)}: K must be at least 2 and divide both "
            f"{max(sizes)} GPUs and the scaling config's {scaled.n_experts} experts"
        )
    chosen = sizes
    if args.scaling_sizes:
        chosen = [int(n) for n in args.scaling_sizes.split(",")]
        if any(n < 1 or max(sizes) % n for n in chosen):
            parser.error(
                f"--scaling-sizes: each size must divide {max(sizes)}, the largest GPU count of "
                "--ranks (strong scaling splits that many GPUs' batch over every size)"
            )
    # Calls that split the phase between them write files of their own.
    tag = f"-scaling-{'-'.join(map(str, chosen))}" if args.scaling_sizes else ""
    tag += "".join("-" + re.sub(r"[^\w.]+", "-", setting) for setting in args.scaling_set)
    result: dict[str, Any] = {"ranks": args.ranks, "device": args.device}
    if args.scaling_set:
        result["scaling_set"] = args.scaling_set
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
    started = time.perf_counter()
    needed = {args.recipe} | ({args.scaling_config} if "scaling" in phases else set())
    for recipe in needed:  # the corpora the runs read
        if not (Path(load_config(recipe).data.data_dir) / "manifest.json").is_file():
            prepare = [sys.executable, "-m", "moegpt.cli", "prepare", "--config", recipe]
            subprocess.run(prepare, env=env(), check=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "out").mkdir()
        if "correctness" in phases:
            result["correctness"] = correctness(args, Path(args.recipe), root, cuda)
            for dtype, part in result["correctness"].items():
                print(heading(f"correctness, {dtype}", part))
                for name, row in part["layouts"].items():
                    plan = row["planner"]
                    versus = row.get("vs_fp32")
                    print(
                        f"  {name:<16} losses {row['loss_rel']:.1e}  params "
                        f"{row['param_rel_norm']:.1e}"
                        + (
                            f" (vs fp32 {versus['loss_rel']:.1e} / {versus['param_rel_norm']:.1e})"
                            if versus
                            else ""
                        )
                        + f"  {'ok' if row['pass'] else 'FAIL'}  "
                        f"state bytes vs plan {plan['state_error']:+.1%}"
                        + (
                            f", peak vs plan {plan['peak_error']:+.1%}"
                            if "peak_error" in plan
                            else ""
                        )
                    )
        if "context" in phases and not cuda:
            print("context parallelism: skipped (ring attention needs CUDA attention kernels)")
        elif "context" in phases:
            result["context"] = context(args, Path(args.recipe), root)
            for what, part in result["context"].items():
                print(heading(f"context parallelism, {what}", part))
                for name, row in part["layouts"].items():
                    verdict = {True: "ok", False: "FAIL"}.get(row.get("pass"), "(not exact)")
                    versus = row.get("vs_fp32")
                    print(
                        f"  {name:<16} vs one GPU: losses {row['loss_rel']:.1e} params "
                        f"{row['param_rel_norm']:.1e}"
                        + (
                            f"; vs fp32: losses {versus['loss_rel']:.1e} params "
                            f"{versus['param_rel_norm']:.1e}"
                            if versus
                            else ""
                        )
                        + f"  {verdict}"
                    )
        if "scaling" in phases:
            result["scaling"] = scaling(args, root, chosen, max(sizes), tag)
            print("scaling (weak: batch per GPU fixed; strong: global batch fixed):")
            for r in result["scaling"]:
                mfu = f"{r['weak_mfu']:.1%}" if r["weak_mfu"] else "n/a"
                print(
                    f"  {r['gpus']} GPUs, {r['layout']}: weak "
                    f"{r['weak_tokens_per_second']:,.0f} tok/s "
                    f"({r['weak_efficiency']:.0%}, MFU {mfu}), strong "
                    f"{r['strong_tokens_per_second']:,.0f} tok/s ({r['strong_efficiency']:.0%})"
                    + profile_note(r)
                )
            for n in sorted({r["gpus"] for r in result["scaling"]} - {1}):
                best = max(
                    (r for r in result["scaling"] if r["gpus"] == n),
                    key=lambda r: r["weak_tokens_per_second"],
                )
                print(f"  best at {n} GPUs: {best['layout']} ({best['weak_efficiency']:.0%} weak)")
        if "serving" in phases:
            result["serving"] = serving(args, root, sizes)
            print("serving (tokens/s: whole run, prompt step included / decoding alone):")
            for r in result["serving"]:
                cells = [
                    f"batch {b['batch']} {b['tokens_per_second']:,.1f} / "
                    f"{b['decode_tokens_per_second']:,.1f}"
                    for b in r.get("batches", [])
                ] or [f"error: {r.get('error')}"]
                sums = " symmetric" if r.get("custom_all_reduce") else ""
                label = f"{r['config']:<12} tp {r['tp']}{sums}"
                print(f"  {label}: {', '.join(cells)} ({r.get('engine')})")
    result["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"multi_gpu-{args.device}-{args.ranks}{tag}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
