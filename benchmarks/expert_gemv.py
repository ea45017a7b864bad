"""A decode step's expert layers and dense projections: the Triton per-row GEMV against the
alternatives it replaced.

For a recipe's expert shapes (w1: (experts, hidden, d_model), w2: (experts, d_model, hidden)),
at a few routed rows, times three ways of multiplying each row by its expert's matrix:
- ``gather+bmm``: copy the routed experts' matrices, then a batched GEMV (the old path);
- ``grouped_mm``: ``torch._grouped_mm`` over rows sorted by expert (the prefill path);
- ``triton``: :func:`moegpt.model.expert_gemv.expert_gemv`, for each ``--blocks`` tiling.

For the attention's fused Q/K/V (qkv) and output (wo) projections at the same rows, cuBLAS
(``F.linear``) against the kernel's dense form (:func:`moegpt.model.expert_gemv.dense_gemv`).

Each is checked against an fp32 reference, timed as the median of ``--repeats`` CUDA-graph
replays of ``--inner`` calls, and reported with the bandwidth it achieves over the bytes it
must read (each distinct routed expert's matrix once, and the rows).

    python benchmarks/expert_gemv.py --configs configs/small-moe.toml,configs/medium-moe.toml
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from moegpt.config import load_config
from moegpt.model import expert_gemv as kernel

DEVICE = torch.device("cuda")


def graph_ms(fn: Callable[[], torch.Tensor], inner: int, repeats: int) -> float:
    """Median time of one call, from ``repeats`` replays of a graph of ``inner`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def routed(rows: int, experts: int) -> torch.Tensor:
    """Expert ids of ``rows`` slots, sorted as the MoE layer sorts them, distinct where they
    can be (the worst case for bytes)."""
    return (
        (torch.randperm(experts)[:rows] if rows <= experts else torch.arange(rows) % experts)
        .sort()[0]
        .to(DEVICE)
    )


def measure_dense(
    weight: torch.Tensor, rows: int, blocks: list[tuple[int, int]], inner: int, repeats: int
) -> dict:
    """A dense projection (out, in) at ``rows`` rows: cuBLAS (``F.linear``) against the
    kernel's dense form for each tiling."""
    n_out, n_in = weight.shape
    x = torch.randn(rows, n_in, device=DEVICE, dtype=weight.dtype)
    want = x.float() @ weight.float().T
    needed = (n_out * n_in + rows * (n_in + n_out)) * weight.element_size()
    ways: dict[str, Callable[[], torch.Tensor]] = {
        "F.linear": lambda: torch.nn.functional.linear(x, weight)
    }
    for block_n, block_k in blocks:
        ways[f"triton {block_n}x{block_k}"] = lambda n=block_n, k=block_k: tiled_dense(
            x, weight, n, k
        )
    return {name: timed(fn, want, needed, inner, repeats) for name, fn in ways.items()}


def timed(
    fn: Callable[[], torch.Tensor], want: torch.Tensor, needed: int, inner: int, repeats: int
) -> dict:
    got = fn().float()
    error = ((got - want).norm() / want.norm()).item()
    ms = graph_ms(fn, inner, repeats)
    return {"us": ms * 1e3, "gb_s": needed / ms / 1e6, "rel_error": error}


def tiled_dense(x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    kernel.BLOCK_N, kernel.BLOCK_K = block_n, block_k
    return kernel.dense_gemv(x, weight)


def measure(
    weight: torch.Tensor, rows: int, blocks: list[tuple[int, int]], inner: int, repeats: int
) -> dict:
    experts, n_out, n_in = weight.shape
    ids = routed(rows, experts)
    x = torch.randn(rows, n_in, device=DEVICE, dtype=weight.dtype)
    want = torch.einsum("soi,si->so", weight[ids].float(), x.float())
    distinct = ids.unique().numel()
    needed = (distinct * n_out * n_in + rows * (n_in + n_out)) * weight.element_size()
    counts = torch.bincount(ids, minlength=experts)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    ways: dict[str, Callable[[], torch.Tensor]] = {
        "gather+bmm": lambda: torch.bmm(weight[ids], x.unsqueeze(-1)).squeeze(-1),
        "grouped_mm": lambda: torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets),
    }
    for block_n, block_k in blocks:
        ways[f"triton {block_n}x{block_k}"] = lambda n=block_n, k=block_k: tiled(
            x, weight, ids, n, k
        )
    return {name: timed(fn, want, needed, inner, repeats) for name, fn in ways.items()}


def tiled(
    x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, block_n: int, block_k: int
) -> torch.Tensor:
    """The kernel with a given tiling (the module's constants are read at each call)."""
    kernel.BLOCK_N, kernel.BLOCK_K = block_n, block_k
    return kernel.expert_gemv(x, weight, ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs/small-moe.toml,configs/medium-moe.toml")
    parser.add_argument("--rows", default="1,2,4,8", help="routed rows (tokens x top-k)")
    parser.add_argument(
        "--blocks", default="16x256,8x256,32x128,4x512", help="BLOCK_NxBLOCK_K tilings"
    )
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    blocks = [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",")]
    torch.manual_seed(0)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": {},
    }
    lines = [
        f"{report['device']}, torch {torch.__version__}: expert GEMV, median of "
        f"{args.repeats} graph replays of {args.inner} calls"
    ]
    for path in args.configs.split(","):
        model = load_config(path).model
        heads = model.n_heads * model.head_dim
        shapes = {
            "w1": (model.n_experts, model.expert_hidden_size, model.d_model),
            "w2": (model.n_experts, model.d_model, model.expert_hidden_size),
            # the attention's dense projections (serving fuses Q, K and V into one matrix)
            "qkv": (heads + 2 * model.n_kv_heads * model.head_dim, model.d_model),
            "wo": (model.d_model, heads),
        }
        for name, shape in shapes.items():
            weight = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) * 0.02
            how = measure_dense if len(shape) == 2 else measure
            for rows in (int(r) for r in args.rows.split(",")):
                key = f"{Path(path).stem} {name} {tuple(shape)} rows {rows}"
                report["rows"][key] = how(weight, rows, blocks, args.inner, args.repeats)
                lines.append(key)
                for way, m in report["rows"][key].items():
                    lines.append(
                        f"    {way:<16} {m['us']:8.1f} us {m['gb_s']:8.0f} GB/s"
                        f"  rel error {m['rel_error']:.1e}"
                    )
            del weight
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"expert_gemv-{report['device'].split()[1].lower()}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.txt").write_text(text + "\n")
    bad = [
        k for k, ways in report["rows"].items() for w, m in ways.items() if m["rel_error"] > 1e-2
    ]
    if bad:
        raise SystemExit(f"error above 1e-2 in {bad}")


if __name__ == "__main__":
    main()
