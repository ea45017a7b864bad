"""The chunked cross-entropy against PyTorch's: the same sum and the same gradient, in fp32
and from bf16 logits, across chunk boundaries and with ignored rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moegpt.train import loss
from moegpt.train.loss import cross_entropy_sum


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = logits.float().flatten(0, -2)
    return F.cross_entropy(flat, labels.flatten(), ignore_index=-100, reduction="sum")


def loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor, scale: float):
    leaf = logits.detach().clone().requires_grad_()
    value = fn(leaf, labels)
    (value * scale).backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])  # one row, a ragged last chunk, one chunk
def test_sum_and_gradient_equal_torch_in_fp32(monkeypatch, chunk_rows: int) -> None:
    vocab = 50
    monkeypatch.setattr(loss, "CHUNK_VALUES", chunk_rows * vocab)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, vocab, generator=gen) * 4
    labels = torch.randint(vocab, (3, 11), generator=gen)
    labels[0, :4] = -100  # padding and prompt tokens carry no label
    labels[2, -1] = -100
    got, got_grad = loss_and_grad(cross_entropy_sum, logits, labels, 0.37)
    want, want_grad = loss_and_grad(reference, logits, labels, 0.37)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    assert got.dtype == torch.float32


def test_bf16_logits_give_torchs_fp32_loss_and_a_bf16_gradient(monkeypatch) -> None:
    """From bf16 logits the loss is fp32 arithmetic (as ``logits.float()`` gives), and the
    gradient comes back in bf16, equal to the plain path's after its cast."""
    vocab = 300
    monkeypatch.setattr(loss, "CHUNK_VALUES", 5 * vocab)
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 9, vocab, generator=gen) * 3).to(torch.bfloat16)
    labels = torch.randint(vocab, (2, 9), generator=gen)
    labels[1, :3] = -100
    got, got_grad = loss_and_grad(cross_entropy_sum, logits, labels, 1 / 15)
    want, want_grad = loss_and_grad(reference, logits, labels, 1 / 15)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert got_grad.dtype == torch.bfloat16
    # Both round the same fp32 gradient to bf16 once: equal but for an ulp where the fp32
    # values differ in their last bits.
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=8e-3, atol=1e-6)


def test_no_label_gives_zero_loss_and_zero_gradient() -> None:
    logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.full((4,), -100)
    value = cross_entropy_sum(logits, labels)
    value.backward()
    assert value.item() == 0.0 and logits.grad is not None and not logits.grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_chunks_equal_the_eager_ones(monkeypatch, dtype: torch.dtype) -> None:
    """On a GPU each chunk runs compiled (fused): forced here on the CPU, the loss and the
    gradient equal the eager chunks' (and so PyTorch's)."""
    vocab = 96
    monkeypatch.setattr(loss, "CHUNK_VALUES", 8 * vocab)
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 10, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(vocab, (2, 10), generator=gen)
    labels[0, :3] = -100
    eager, eager_grad = loss_and_grad(cross_entropy_sum, logits, labels, 0.25)
    monkeypatch.setattr(loss, "COMPILED_ON", ("cpu",))
    fused, fused_grad = loss_and_grad(cross_entropy_sum, logits, labels, 0.25)
    assert loss._compiled, "the chunks did not run compiled"
    torch.testing.assert_close(fused, eager, rtol=1e-6, atol=1e-5)
    assert fused_grad.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {}
    torch.testing.assert_close(fused_grad.float(), eager_grad.float(), **tolerance)
