"""Train several layouts in one torchrun job (one process-group start for all of them), or
one in-process: what the parallel tests and `benchmarks/multi_gpu.py` compare. Each job
resumes its run directory, trains a few steps, saves, and rank 0 writes the losses, each
rank's state bytes (and peak device memory), the step times, a profiled step's communication
when asked, and the full final parameters. A timing job (``"timing": true``, the scaling
benchmark's) writes the losses, step times and profile alone: no checkpoint, evaluation or
parameters, whose gathers and writes took longer than its steps.

    torchrun --nproc-per-node N -m moegpt.harness.jobs JOBS.json
    python -m moegpt.harness.jobs JOBS.json        # one process, no torchrun
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from moegpt.config import load_config
from moegpt.parallel.mesh import ParallelDims, init_distributed, launched_by_torchrun, local_device
from moegpt.train.trainer import Trainer


def full_parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the model as whole tensors, on rank 0 (and in one process)."""
    state: dict[str, torch.Tensor] = {}
    for model in trainer.parts.models:
        part = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        state |= {k: v.detach().cpu().clone() for k, v in part.items()}
    if not dist.is_initialized():
        return state
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, state)
    merged: dict[str, torch.Tensor] = {}
    for part in everyone:
        merged |= part
    return merged


def run_job(job: dict[str, Any], distributed: bool) -> None:
    """Resume ``run_dir`` (or start it from ``train.init_from``), train ``steps`` steps,
    save, evaluate; write ``out``.json and .safetensors. In-process, the device memory the job
    used is handed back at the end: a caller's next job may be a torchrun child on the same
    GPU (this process's caching allocator once kept ~53 GB from one, and the child ran out)."""
    try:
        _run_job(job, distributed)
    finally:
        if not distributed and torch.cuda.is_available():
            gc.collect()  # the trainer's reference cycles hold its tensors until collected
            torch.cuda.empty_cache()


def _run_job(job: dict[str, Any], distributed: bool) -> None:
    config = load_config(Path(job["recipe"]), job["overrides"])
    device = local_device()
    dims = ParallelDims.build(config.parallel, device) if distributed else None
    trainer = Trainer(config, Path(job["run_dir"]), device=device, log=lambda m: None, dims=dims)
    trainer.prepare()
    # The weights before the first step, when asked: every layout must start from the
    # one-process weights (meta-device initialisation).
    initial = full_parameters(trainer) if job.get("initial") else None
    batches = iter(trainer.loader)
    steps = [_timed_step(trainer, batches) for _ in range(job["steps"])]
    record: dict[str, Any] = {"losses": [s["loss"] for s in steps]}
    record["aux_losses"] = [s["aux_loss"] for s in steps]
    record["tokens_per_second"] = [s.get("tokens_per_second") for s in steps]
    record["mfu"] = [s.get("mfu") for s in steps]
    record["ranks"] = trainer.rank_memory()
    if job.get("profile"):
        record |= communication_profile(trainer, batches)
    timing = job.get("timing", False)
    if not timing:
        trainer.save()
        record["eval"] = trainer.evaluate()
        params = full_parameters(trainer)
    if not trainer.rank0:
        return
    out = Path(job["out"])
    out.with_suffix(".json").write_text(json.dumps(record))
    if timing:
        return
    save_file({k: v.contiguous() for k, v in params.items()}, out.with_suffix(".safetensors"))
    if initial is not None:
        path = out.with_suffix(".initial.safetensors")
        save_file({k: v.contiguous() for k, v in initial.items()}, path)


def _timed_step(trainer: Trainer, batches: Any) -> dict[str, Any]:
    """One training step with its tokens/s and MFU (the trainer's own accounting)."""
    start = time.perf_counter()
    out = trainer.train_step(batches)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return out | trainer.throughput(out["tokens"], time.perf_counter() - start)


# Kernel and op names of all-to-all exchanges: PyTorch's ops on CPU ("c10d::alltoall_"), and
# on GPUs NCCL's kernel for them, which NCCL builds from grouped sends and receives
# ("ncclDevKernel_SendRecv"); pipeline stages' point-to-point transfers share that kernel.
EXCHANGE_NAMES = ("alltoall", "sendrecv")


def communication_profile(trainer: Trainer, batches: Any) -> dict[str, float | None]:
    """One profiled training step's communication, as shares of the step.

    ``all_to_all_share``: all-to-all exchanges' (expert parallelism's dispatch and combine)
    share of the summed kernel time (host op time on CPU). On a GPU, over the step's span on
    this rank's device: ``communication_share``, the time any NCCL kernel runs;
    ``exposed_communication_share``, the time one runs with no compute beside it (what
    scaling loses to the network); ``idle_share``, the time no kernel runs (the host or a
    peer holds the step up). None on CPU, where gloo works on the host."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        trainer.train_step(batches)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    exchange = sum(
        getattr(e, attr)
        for e in events
        if any(name in e.key.lower().replace("_", "") for name in EXCHANGE_NAMES)
    )
    out: dict[str, float | None] = {"all_to_all_share": exchange / total if total else 0.0}
    out |= dict.fromkeys(("communication_share", "exposed_communication_share", "idle_share"))
    if cuda:
        device = torch.cuda.current_device()
        kernels = [
            e
            for e in prof.profiler.kineto_results.events()
            if e.device_type() == torch.autograd.DeviceType.CUDA and e.device_index() == device
        ]
        spans: dict[str, list[tuple[int, int]]] = {"comm": [], "compute": [], "copies": []}
        for e in kernels:
            name = e.name().lower()
            copy = name.startswith(("memcpy", "memset"))
            kind = "comm" if "nccl" in name else "copies" if copy else "compute"
            spans[kind].append((e.start_ns(), e.end_ns()))
        out |= overlap_shares(spans["comm"], spans["compute"], spans["copies"])
    return out


def union_length(intervals: list[tuple[int, int]]) -> int:
    """The length of the union of ``(start, end)`` intervals."""
    covered, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            covered += end - start
            reach = end
        elif end > reach:
            covered += end - reach
            reach = end
    return covered


def overlap_shares(
    comm: list[tuple[int, int]],
    compute: list[tuple[int, int]],
    copies: Sequence[tuple[int, int]] = (),
) -> dict[str, float]:
    """Over the span of all the intervals: communication's share, the share where it runs
    with no compute beside it (copies, the copy engines' work, are not compute), and the
    share where nothing runs."""
    everything = [*comm, *compute, *copies]
    span = max((end for _, end in everything), default=0)
    span -= min((start for start, _ in everything), default=0)
    if span <= 0:
        return {"communication_share": 0.0, "exposed_communication_share": 0.0, "idle_share": 0.0}
    return {
        "communication_share": union_length(comm) / span,
        "exposed_communication_share": (union_length(comm + compute) - union_length(compute))
        / span,
        "idle_share": (span - union_length(everything)) / span,
    }


def main(jobs_file: str) -> None:
    """Run the jobs as ranks of the torchrun job this process belongs to, or alone."""
    jobs = json.loads(Path(jobs_file).read_text())
    if not launched_by_torchrun():
        for job in jobs:
            run_job(job, distributed=False)
        return
    init_distributed(local_device(), timeout_s=300)
    for job in jobs:
        run_job(job, distributed=True)
    # Rank 0 may still be writing results: tearing gloo down under it can abort a peer.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
