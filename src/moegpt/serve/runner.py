"""The model runner: one packed forward over every scheduled chunk, through the paged cache.

Its input is plain data (token ids, positions, cache slots), so tensor-parallel followers can
receive it from rank 0 and run the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from moegpt.config import ServeConfig
from moegpt.model import Transformer
from moegpt.serve.paged import (
    DecodeBatch,
    PagedKVCache,
    PagedStep,
    SequenceSlice,
    bytes_per_token,
)


@dataclass
class ModelInput:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    # per sequence: (offset in the packed batch, new tokens, tokens already cached, all slots)
    sequences: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)  # packed rows to return logits of


class Runner(Protocol):
    """What runs a step's forward: one process's :class:`ModelRunner`, or rank 0's
    tensor-parallel runner that sends each step to its followers first."""

    cache: PagedKVCache

    def execute(self, inp: ModelInput) -> torch.Tensor: ...


# cuDNN attention builds a plan for every new shape and mask, milliseconds of host time per
# call when each step's decode batch has a new longest context; the other kernels need none.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        device: torch.device,
        batch_invariant: bool = True,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.batch_invariant = batch_invariant

    @torch.inference_mode()
    def execute(self, inp: ModelInput) -> torch.Tensor:
        """Logits (len(logits_rows), vocab) in fp32."""
        self.cache.copy_blocks(inp.copies)
        if not inp.tokens:
            return torch.empty(0)
        padded = not self.batch_invariant and sum(new == 1 for _, new, _, _ in inp.sequences) > 1
        slots: list[int] = []
        new_slots: list[int] = []
        singles: list[SequenceSlice] = []
        decodes: list[list[int]] = [[], [], []]  # rows, starts, lengths
        for offset, new, past, seq_slots in inp.sequences:
            if padded and new == 1:
                for column, value in zip(decodes, (offset, len(slots), past + 1), strict=True):
                    column.append(value)
            else:
                singles.append(SequenceSlice(offset, new, past, len(slots)))
            new_slots += seq_slots[past:]
            slots += seq_slots
        # Everything the step needs on the device travels as one host-to-device copy.
        parts = [inp.tokens, inp.positions, new_slots, slots, inp.logits_rows, *decodes]
        flat = torch.tensor([v for part in parts for v in part]).to(self.device, non_blocking=True)
        tokens, positions, new_at, slots_at, logits_rows, rows, starts, lengths = flat.split(
            [len(part) for part in parts]
        )
        batch = None
        if padded:
            batch = DecodeBatch(rows, starts, lengths, max(decodes[2]))
        step = PagedStep(self.cache, slots_at, new_at, singles, batch)
        with sdpa_kernel(SDPA_BACKENDS):
            out = self.model(tokens[None], positions=positions[None], cache=step)
        return out.logits[0, logits_rows].float()


def default_num_blocks(
    model: Transformer, config: ServeConfig, dtype: torch.dtype, extra_token_bytes: int = 0
) -> int:
    """Blocks for every sequence at full context on CPU; on a GPU, 90% of the free memory,
    shared with ``extra_token_bytes`` per token of another cache on the same block tables
    (a draft model's)."""
    token_bytes = bytes_per_token(model.config, dtype, config.tp) + extra_token_bytes
    block_bytes = token_bytes * config.block_size
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(int(free * 0.9) // block_bytes, 1)
    per_sequence = -(-model.config.max_seq_len // config.block_size)
    return config.max_batch_size * per_sequence


def build_runner(
    model: Transformer,
    config: ServeConfig,
    tp_group: dist.ProcessGroup | None = None,
    extra_token_bytes: int = 0,
) -> ModelRunner:
    """A runner over a new paged cache of ``config.num_kv_blocks`` blocks (or as many as fit);
    tensor-parallel ranks agree on the smallest count."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    blocks = config.num_kv_blocks or default_num_blocks(model, config, dtype, extra_token_bytes)
    if tp_group is not None:
        agreed = torch.tensor([blocks], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=tp_group)
        blocks = int(agreed)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    cache = PagedKVCache(model.config, blocks, config.block_size, dtype, device, tp=tp)
    mode = config.decode_attention
    if mode == "auto":
        mode = "padded" if device.type == "cuda" else "per_sequence"
    return ModelRunner(model, cache, device, batch_invariant=mode == "per_sequence")
