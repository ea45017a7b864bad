"""The model runner: one packed forward over every scheduled chunk, through the paged cache.

Its input is plain data (token ids, positions, cache slots), so tensor-parallel followers can
receive it from rank 0 and run the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moegpt.model import Transformer
from moegpt.serve.paged import PagedKVCache, PagedStep, SequenceSlice


@dataclass
class ModelInput:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    # per sequence: (offset in the packed batch, new tokens, tokens already cached, all slots)
    sequences: list[tuple[int, int, int, list[int]]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)  # packed rows to return logits of


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device

    @torch.no_grad()
    def execute(self, inp: ModelInput) -> torch.Tensor:
        """Logits (len(logits_rows), vocab) in fp32."""
        self.cache.copy_blocks(inp.copies)
        if not inp.tokens:
            return torch.empty(0)
        device = self.device
        slices = [
            SequenceSlice(offset, new, past, torch.tensor(slots, device=device))
            for offset, new, past, slots in inp.sequences
        ]
        tokens = torch.tensor([inp.tokens], device=device)
        positions = torch.tensor([inp.positions], device=device)
        out = self.model(tokens, positions=positions, cache=PagedStep(self.cache, slices))
        return out.logits[0, inp.logits_rows].float()
