"""The language-modelling loss: summed cross-entropy over label tokens, computed in row chunks.

``F.cross_entropy(logits.float(), ...)`` over a 32k vocabulary materialises the logits in fp32
twice (the upcast, and the log-softmax autograd keeps for the backward) and writes an fp32
gradient that is then cast back: at 16k tokens a micro-batch, 2 GB each, and several passes
over them in memory-bound kernels. Here the forward keeps only each row's log-sum-exp, the
backward recomputes the softmax chunk by chunk from the logits themselves and writes the
gradient once in the logits' dtype. Arithmetic is fp32 throughout, as in the plain loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

# Rows a chunk: about 64M fp32 values of temporaries (256 MB) whatever the vocabulary.
CHUNK_VALUES = 1 << 26


def _row_chunks(rows: int, vocab: int) -> Iterator[slice]:
    step = max(1, CHUNK_VALUES // vocab)
    return (slice(start, start + step) for start in range(0, rows, step))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
    ) -> torch.Tensor:
        kept = labels != ignore_index
        safe = torch.where(kept, labels, 0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for rows in _row_chunks(*logits.shape):
            chunk = logits[rows].float()
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            losses = lse[rows] - chunk.gather(1, safe[rows, None]).squeeze(1)
            total += losses.masked_fill(~kept[rows], 0.0).sum()
        ctx.save_for_backward(logits, safe, kept, lse)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, safe, kept, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _row_chunks(*logits.shape):
            # d(lse - picked)/d(logits) = softmax - one-hot, for rows with a label only.
            soft = (logits[rows].float() - lse[rows, None]).exp_()
            soft.scatter_add_(1, safe[rows, None], soft.new_full((soft.shape[0], 1), -1.0))
            grad[rows] = soft.mul_(grad_total.float() * kept[rows, None])
        return grad, None, None


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """The fp32 sum of ``-log softmax(logits)[label]`` over rows whose label is not
    ``ignore_index``: ``logits`` (..., vocab) in any float dtype, ``labels`` (...) ids. Equal
    to ``F.cross_entropy(logits.float(), labels, reduction="sum")``, gradient included."""
    vocab = logits.shape[-1]
    return _ChunkedCrossEntropy.apply(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index)
