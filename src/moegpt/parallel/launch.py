"""`moegpt train --nproc N`: start N ranks on this machine through torchrun."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from moegpt.children import run_child

# Multi-GPU hosts here must keep NVLink multicast (NVLS) off; set for every rank unless the
# user chose otherwise.
GPU_ENV_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def torchrun_command(nproc: int, max_restarts: int, child_argv: Sequence[str]) -> list[str]:
    """torchrun running ``moegpt <child_argv>`` on ``nproc`` local ranks; after a rank dies
    every rank is stopped and, up to ``max_restarts`` times, all restart (and resume)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "moegpt.cli",
        *child_argv,
    ]


def rank_env_defaults(nproc: int) -> dict[str, str]:
    """What every one of ``nproc`` local ranks runs with unless the user set it: NVLS off,
    and one BLAS thread pool per rank sharing the cores (torchrun would force 1 and warn)."""
    return {**GPU_ENV_DEFAULTS, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}


# How long torchrun's agent lets its ranks finish after passing them a SIGTERM or Ctrl-C (its
# default is 30 s) before it kills them: a step and a checkpoint save of a large model take
# longer. (Read by torch >= 2.13's agent; older agents keep 30 s.)
SHUTDOWN_TIMEOUT_S = 600


def launch(nproc: int, max_restarts: int, child_argv: Sequence[str]) -> int:
    env = {
        **rank_env_defaults(nproc),
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S),
        **os.environ,
    }
    return run_child(torchrun_command(nproc, max_restarts, child_argv), env)
