"""How much memory a KV cache may take, so a config's context length never sizes one alone.

On a GPU the cache gets a share of the free device memory (as vLLM's gpu_memory_utilization),
at most ``MOEGPT_GPU_KV_GIB`` GiB when that is set (so that several processes can share one
device); on CPU a share of the memory available to this process (MemAvailable, within its
cgroup's limit), at most ``MOEGPT_CPU_KV_GIB`` GiB (default 4, as vLLM's
VLLM_CPU_KVCACHE_SPACE).
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


def _gib_setting(name: str, default: float | None) -> float | None:
    """The environment's ``name`` in bytes (given in GiB), or ``default`` GiB when unset."""
    setting = os.environ.get(name)
    if setting is None:
        return None if default is None else default * GIB
    try:
        cap = float(setting) * GIB
    except ValueError:
        cap = -1.0
    if not cap > 0:
        raise UserError(f"{name}: expected a positive number of GiB, got {setting!r}")
    return cap


def kv_budget_bytes(device: torch.device) -> tuple[int, str]:
    """Bytes a KV cache on ``device`` may take, and a few words saying where that comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        name, fraction, share = "MOEGPT_GPU_KV_GIB", GPU_FRACTION, f"the free memory of {device}"
        available, cap = free, _gib_setting("MOEGPT_GPU_KV_GIB", None)
    else:
        name, fraction, share = "MOEGPT_CPU_KV_GIB", CPU_FRACTION, "the available host memory"
        available, cap = host_available_bytes(), _gib_setting(name, CPU_DEFAULT_GIB)
    if cap is not None and cap < available * fraction:
        return int(cap), f"{name} ({cap / GIB:g} GiB)"
    return int(available * fraction), f"{fraction:.0%} of {share}"


def gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"
