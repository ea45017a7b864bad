"""Tensor parallelism for serving: the training plan's splits
(:func:`moegpt.parallel.tensor.tensor_parallel_plan`) on plain tensors.

Training splits the model into DTensors, whose placements autograd needs. Serving computes no
gradients, and DTensor's dispatch costs host time on every operation: an eager prefill step of
small-moe took 193 ms at TP2 against 18 ms in one process (H200). Here each rank holds plain
blocks of the same tensors, and the few collectives a forward needs are explicit functional
ones, which CUDA graphs capture and ``torch.compile`` traces (sums through symmetric memory on
the GPUs of one host where :func:`moegpt.parallel.symmetric.enable` set it up):

- an all-reduce after each row-split projection (attention output, dense ``w2``) and after the
  experts (each rank runs its slice of every expert's hidden units);
- an all-reduce after the vocabulary-split embedding (each rank embeds the ids it holds);
- an all-gather of the vocabulary-split head's logits.

The blocks are exactly DTensor's ``Shard`` blocks (``torch.chunk``'s: ceiling-sized, the last
ones shorter), so a rank reads the same slice of a model folder as in training.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.model.moe import GroupedExperts
from moegpt.parallel.experts import HIDDEN_DIM
from moegpt.parallel.symmetric import all_reduce_sum
from moegpt.parallel.tensor import tensor_parallel_plan

Block = tuple[slice, ...]  # a rank's block of a whole tensor, one slice per dimension

# The dimension of a module's weight that each split divides (Linear and Embedding weights are
# (out, in) and (vocabulary, width)).
_SPLIT_DIM = {"column": 0, "row": 1, "vocab_embedding": 0, "vocab_head": 0}


def chunk_of(size: int, rank: int, ranks: int) -> slice:
    """Rank ``rank``'s part of ``size`` rows split over ``ranks`` as ``torch.chunk`` (and
    DTensor's ``Shard``) splits them."""
    chunk = -(-size // ranks)
    start = min(rank * chunk, size)
    return slice(start, min(start + chunk, size))


def shard_for_serving(model: Transformer, group: dist.ProcessGroup) -> dict[str, Block]:
    """Split ``model`` (built on the meta device) over the ranks of ``group`` in place, and
    return each split parameter's block of the whole tensor, by name, for the loader."""
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("shard_for_serving expects a model built on the meta device")
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    vocab = model.config.vocab_size
    blocks: dict[str, Block] = {}

    def split(owner: nn.Module, prefix: str, attr: str, dim: int) -> slice:
        whole: torch.Tensor = getattr(owner, attr)
        block = [slice(0, n) for n in whole.shape]
        block[dim] = chunk_of(whole.shape[dim], rank, ranks)
        shape = [b.stop - b.start for b in block]
        setattr(owner, attr, nn.Parameter(whole.new_empty(shape), requires_grad=False))
        blocks[f"{prefix}.{attr}"] = tuple(block)
        return block[dim]

    for name, kind in tensor_parallel_plan(model, ranks).items():
        if kind == "replicated_kv":
            continue
        last = chunk_of(vocab, ranks - 1, ranks)
        if kind.startswith("vocab") and last.start == last.stop:  # every rank sees the same
            raise UserError(f"serve.tp: a {vocab}-token vocabulary leaves rank {ranks - 1} no rows")
        module = model.get_submodule(name)
        rows = split(module, name, "weight", _SPLIT_DIM[kind])
        if kind == "row":
            module.register_forward_hook(lambda _m, _i, out: all_reduce_sum(out, group))
        elif kind == "vocab_head":
            module.register_forward_hook(lambda _m, _i, out: _gather_vocab(out, vocab, group))
        elif kind == "vocab_embedding":
            module.forward = types.MethodType(_embedding_forward(rows, group), module)
    for name, experts in model.named_modules():
        if isinstance(experts, GroupedExperts):
            for weight in experts.weights():
                split(experts, name, weight, HIDDEN_DIM[weight])
            experts.register_forward_hook(lambda _m, _i, out: all_reduce_sum(out, group))
    return blocks


def _gather_vocab(logits: torch.Tensor, vocab: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The whole vocabulary's logits from each rank's block (the last one may be shorter:
    blocks are padded to one size for the gather, the padding dropped after)."""
    ranks = dist.get_world_size(group)
    chunk = -(-vocab // ranks)
    padded = F.pad(logits, (0, chunk - logits.shape[-1]))
    gathered = funcol.all_gather_tensor(padded.contiguous(), gather_dim=0, group=group)
    parts = gathered.view(ranks, *logits.shape[:-1], chunk)
    return torch.cat(parts.unbind(0), dim=-1)[..., :vocab]


def _embedding_forward(rows: slice, group: dist.ProcessGroup):
    """An embedding's forward over its vocabulary rows ``rows``: ids outside them embed as
    zeros here, and the sum over ranks gives every id its row."""

    def forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        local = ids - rows.start
        outside = (local < 0) | (local >= rows.stop - rows.start)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce_sum(out.masked_fill(outside[..., None], 0), group)

    return forward
