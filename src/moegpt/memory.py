"""How much memory a KV cache may take, so a config's context length never sizes one alone.

On a GPU the cache gets a share of the free device memory (as vLLM's gpu_memory_utilization);
on CPU a share of the memory available to this process (MemAvailable, within its cgroup's
limit), at most ``MOEGPT_CPU_KV_GIB`` GiB (default 4, as vLLM's VLLM_CPU_KVCACHE_SPACE).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moegpt.errors import UserError

GPU_FRACTION = 0.9  # of the free device memory
CPU_FRACTION = 0.5  # of the available host memory
CPU_DEFAULT_GIB = 4.0
GIB = 1 << 30


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdecimal() else None  # "max": no limit


def host_available_bytes() -> int:
    """Memory this process could still allocate on the host."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            available = 8 * GIB  # nothing to ask: assume a small machine
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:
            available = min(available, max(cap - used, 0))
    return available


def kv_budget_bytes(device: torch.device) -> tuple[int, str]:
    """Bytes a KV cache on ``device`` may take, and a few words saying where that comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FRACTION), f"{GPU_FRACTION:.0%} of the free memory of {device}"
    available = host_available_bytes()
    setting = os.environ.get("MOEGPT_CPU_KV_GIB", str(CPU_DEFAULT_GIB))
    try:
        cap = float(setting) * GIB
    except ValueError:
        cap = -1.0
    if not cap > 0:
        raise UserError(f"MOEGPT_CPU_KV_GIB: expected a positive number of GiB, got {setting!r}")
    if cap < available * CPU_FRACTION:
        return int(cap), f"MOEGPT_CPU_KV_GIB ({cap / GIB:g} GiB)"
    return int(available * CPU_FRACTION), f"{CPU_FRACTION:.0%} of the available host memory"


def gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"
