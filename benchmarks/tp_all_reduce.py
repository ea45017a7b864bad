"""The tensor-parallel all-reduce of serving, NCCL against symmetric memory
(:mod:`moegpt.parallel.symmetric`), on the GPUs of one host: for each size, the result of both
(inputs are small integers, so every order of summation is exact and the two must agree bit for
bit) and the time per call, eager and replayed from a CUDA graph of ``--calls`` calls in a row
(how the decode graphs run them), the median of ``--repeats`` replays.

    torchrun --standalone --nproc-per-node 2 benchmarks/tp_all_reduce.py --out r.json
    torchrun --standalone --nproc-per-node 2 benchmarks/tp_all_reduce.py --width 64 --tokens 1,4

On CPU ranks (gloo) only the NCCL column runs: symmetric memory needs GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moegpt.parallel import symmetric


def nccl(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))


def timed(fn, x: torch.Tensor, calls: int, repeats: int, graph: bool) -> float:
    """Median microseconds per call over ``repeats`` runs of ``calls`` calls."""
    cuda = x.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def burst() -> None:
        y = x
        for _ in range(calls):
            y = fn(y) * 0.5  # a chain, as a model's layers are: each call waits on the last
        return y

    run = burst
    if graph:
        burst()  # warm up outside the capture
        sync()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            burst()
        run = cuda_graph.replay
    run()
    sync()
    times = []
    for _ in range(repeats):
        dist.barrier()
        sync()
        started = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=2048, help="model width (elements a token)")
    parser.add_argument("--tokens", default="1,8,32,128,512,2048,8192")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calls", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="JSON file rank 0 writes")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    group, rank, ranks = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    enabled = symmetric.enable(group, device, dtype)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        generator = torch.Generator(device=device).manual_seed(rank)
        x = torch.randint(-8, 8, (tokens, args.width), generator=generator, device=device)
        x = x.to(dtype)
        row = {"tokens": tokens, "bytes": x.numel() * x.element_size()}
        row["route"] = symmetric._route(x, group.group_name, ranks) if enabled else "nccl"
        reference = nccl(x, group)
        row["nccl_eager_us"] = timed(lambda y: nccl(y, group), x, args.calls, args.repeats, False)
        if cuda:
            fn = lambda y: nccl(y, group)  # noqa: E731
            row["nccl_graph_us"] = timed(fn, x, args.calls, args.repeats, True)
        if enabled:
            ours = symmetric.all_reduce_sum(x, group)
            row["exact"] = bool(torch.equal(funcol.wait_tensor(ours), reference))
            fn = lambda y: symmetric.all_reduce_sum(y, group)  # noqa: E731
            row["symmetric_eager_us"] = timed(fn, x, args.calls, args.repeats, False)
            row["symmetric_graph_us"] = timed(fn, x, args.calls, args.repeats, True)
        rows.append(row)
    if rank == 0:
        gpu = torch.cuda.get_device_name() if cuda else "cpu"
        print(
            f"all-reduce of {args.dtype} rows of {args.width} over {ranks} ranks ({gpu}), µs a call"
        )
        print(
            f"{'tokens':>7} {'KiB':>8} {'route':>9} {'NCCL':>8} {'NCCL graph':>11} "
            f"{'symm':>8} {'symm graph':>11} exact"
        )
        for r in rows:
            cells = [
                r.get(k)
                for k in (
                    "nccl_eager_us",
                    "nccl_graph_us",
                    "symmetric_eager_us",
                    "symmetric_graph_us",
                )
            ]
            text = [f"{c:8.1f}" if c is not None else f"{'-':>8}" for c in cells]
            print(
                f"{r['tokens']:7d} {r['bytes'] / 1024:8.1f} {r['route']:>9} {text[0]} "
                f"{text[1]:>11} {text[2]} {text[3]:>11} {r.get('exact', '-')}"
            )
        if args.out:
            record = {"gpu": gpu, "ranks": ranks, "dtype": args.dtype, "width": args.width}
            Path(args.out).write_text(json.dumps({**record, "rows": rows}, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
