"""All-reduce through symmetric memory, for tensor-parallel serving on the GPUs of one host.

A TP decode step sums a few kilobytes per rank twice a layer. NCCL's all-reduce costs tens of
microseconds at any size that small (its protocol, not the bytes), which made small-moe's
decode slower at TP2 than on one GPU. Symmetric memory (``torch.distributed._symmetric_memory``)
maps each rank's buffer into every peer's address space over NVLink, so one kernel can copy the
input into the rank's buffer, meet the peers at a barrier of device flags, and read and sum all
buffers itself: a few microseconds. vLLM's custom all-reduce and torchtitan's custom comm
backend are built the same way; the sizes where NCCL is faster still go to NCCL.

- one-shot (each rank reads every peer's whole buffer) up to ``ONE_SHOT_MAX_BYTES``;
- two-shot (reduce-scatter then all-gather, over the same buffers) up to ``TWO_SHOT_MAX_BYTES``;
- NCCL above, and everywhere symmetric memory is not set up (CPU, gloo, other world sizes).

The choice depends on shapes alone, so every rank (and a compiled graph) takes the same branch.
Both kernels end on a barrier, so one buffer per group and dtype serves every call in turn.
The kernels run inside a custom op, opaque to ``torch.compile`` and captured by CUDA graphs
like any other kernel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# Crossovers torchtitan measured on H100s over NVLink (P2P, no multicast: KINDS.md keeps NVLink
# multicast off on these machines): one-shot up to 128 KiB, two-shot up to 16 MiB.
ONE_SHOT_MAX_BYTES = 128 * 2**10
TWO_SHOT_MAX_BYTES = 16 * 2**20
_WORLD_SIZES = (2, 4, 8)  # the kernels' compiled world sizes
_DTYPES = (torch.bfloat16, torch.float32)  # the kernels' (no float16)
_ALIGN = 16  # bytes: the kernels' widest vector access

# (group name, dtype) -> this rank's rendezvoused buffer of TWO_SHOT_MAX_BYTES
_buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def enable(group: dist.ProcessGroup, device: torch.device, dtype: torch.dtype) -> bool:
    """Allocate ``group``'s symmetric buffer for ``dtype`` on ``device`` and exchange its
    handles. Every rank of ``group`` calls this together, before any graph is captured. False
    (and NCCL stays) where symmetric memory does not apply."""
    ranks = dist.get_world_size(group)
    if device.type != "cuda" or dtype not in _DTYPES or ranks not in _WORLD_SIZES:
        return False
    import torch.distributed._symmetric_memory as symm_mem

    key = (group.group_name, dtype)
    if key not in _buffers:
        buffer = symm_mem.empty(TWO_SHOT_MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group=group)
        _buffers[key] = buffer
    return True


def _route(x: torch.Tensor, group_name: str, ranks: int) -> str:
    """How ``x`` is summed ("one_shot", "two_shot" or "nccl"), from its shape and dtype
    alone."""
    if (group_name, x.dtype) not in _buffers:
        return "nccl"
    nbytes = x.numel() * x.element_size()
    if nbytes == 0 or nbytes % _ALIGN:
        return "nccl"
    if nbytes <= ONE_SHOT_MAX_BYTES:
        return "one_shot"
    if nbytes <= TWO_SHOT_MAX_BYTES and nbytes % (_ALIGN * ranks) == 0:
        return "two_shot"
    return "nccl"


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group``: through symmetric memory where
    :func:`enable` set it up and the size suits it, else NCCL's (or gloo's) all-reduce."""
    route = _route(x, group.group_name, dist.get_world_size(group))
    if route == "nccl":
        return funcol.all_reduce(x, "sum", group)
    return torch.ops.moegpt.symmetric_all_reduce(x, group.group_name, route)


@torch.library.custom_op("moegpt::symmetric_all_reduce", mutates_args=())
def symmetric_all_reduce(x: torch.Tensor, group_name: str, route: str) -> torch.Tensor:
    buffer = _buffers[(group_name, x.dtype)]
    # The kernels need a contiguous input as aligned as the buffer (16 bytes).
    if not x.is_contiguous() or (x.storage_offset() * x.element_size()) % _ALIGN:
        x = x.clone(memory_format=torch.contiguous_format)
    staged = buffer[: x.numel()].view_as(x)
    out = x.new_empty(x.shape)
    if route == "one_shot":  # copies x into the buffer itself
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(staged, x, "sum", group_name, out)
    else:
        staged.copy_(x)
        torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", group_name, out)
    return out


@symmetric_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str, route: str) -> torch.Tensor:
    return x.new_empty(x.shape)
