"""A decode step's dense projections through the GEMV kernel: which products take it (on CPU,
with the kernel stood in for), and, on a GPU with Triton, that it equals cuBLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moegpt.model import Transformer
from moegpt.model import expert_gemv as gemv
from moegpt.model.attention import Attention
from moegpt.model.feed_forward import FeedForward
from moegpt.model.rope import rope_cos_sin
from tests.conftest import small_config

GPU = torch.cuda.is_available() and gemv.triton is not None


@pytest.fixture
def kernel_calls(monkeypatch) -> list[tuple[int, tuple[int, ...]]]:
    """Make the kernel 'apply' on CPU, standing in for it with F.linear, and record each call's
    rows and weight shape."""
    calls: list[tuple[int, tuple[int, ...]]] = []

    def stand_in(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], tuple(weight.shape)))
        return F.linear(x, weight)

    monkeypatch.setattr(gemv, "kernel_applies", lambda x, w: True)
    monkeypatch.setattr(gemv, "_dense_gemv", stand_in, raising=False)
    return calls


def test_decode_rows_take_the_kernel_and_nothing_else_does(kernel_calls) -> None:
    config = small_config(n_heads=4, n_kv_heads=1)
    attn = Attention(config, layer_idx=0)
    attn.fuse_projections()
    ffn = FeedForward(config, hidden=64)
    cos, sin = rope_cos_sin(torch.arange(1), 8, 10000.0)
    one_row = torch.randn(1, 1, config.d_model)
    with torch.inference_mode():
        served = attn(one_row, cos, sin), ffn(one_row)
    d, qkv = config.d_model, 4 * 8 + 2 * 8
    assert kernel_calls == [(1, (qkv, d)), (1, (d, 32)), (1, (64, d)), (1, (64, d)), (1, (d, 64))]
    # same numbers as the modules' own calls (the stand-in is F.linear: the dispatch only)
    torch.testing.assert_close(served[0], attn(one_row, cos, sin))
    torch.testing.assert_close(served[1], ffn(one_row))

    kernel_calls.clear()
    cos, sin = rope_cos_sin(torch.arange(gemv.DENSE_GEMV_MAX_ROWS + 1), 8, 10000.0)
    many = torch.randn(1, gemv.DENSE_GEMV_MAX_ROWS + 1, config.d_model)
    with torch.inference_mode():
        attn(many, cos, sin), ffn(many)  # a prefill: cuBLAS
    attn(one_row, *rope_cos_sin(torch.arange(1), 8, 10000.0)), ffn(one_row)  # training
    assert kernel_calls == []


def test_sharded_weights_run_as_their_modules(kernel_calls) -> None:
    class Sharded(torch.Tensor):  # any tensor subclass (a DTensor) keeps its module's call
        pass

    weight = torch.randn(16, 32).as_subclass(Sharded)
    with torch.inference_mode():
        assert not gemv.dense_gemv_applies(torch.randn(1, 32), weight)
        assert gemv.dense_gemv_applies(torch.randn(1, 32), torch.randn(16, 32))


@pytest.mark.skipif(not GPU, reason="the Triton kernel runs on CUDA")
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(2304, 2048), (1024, 1024), (1000, 520)])
def test_dense_gemv_equals_cublas(rows: int, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, shape[1], device="cuda", dtype=torch.bfloat16)
    want = x.float() @ weight.float().T
    got = gemv.dense_gemv(x, weight).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.skipif(not GPU, reason="the Triton kernel runs on CUDA")
def test_a_decode_step_with_the_kernel_equals_one_without(monkeypatch) -> None:
    torch.manual_seed(0)
    model = Transformer(small_config(d_model=256, n_heads=4, n_kv_heads=1, n_experts=0))
    model = model.to("cuda", torch.bfloat16).eval()
    model.fuse_projections()
    tokens = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
    with torch.inference_mode():
        with_kernel = model(tokens).logits.float()
        monkeypatch.setattr(gemv, "DENSE_GEMV_MAX_ROWS", 0)
        without = model(tokens).logits.float()
    assert ((with_kernel - without).norm() / without.norm()).item() < 1e-2
