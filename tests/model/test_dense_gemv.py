"""A decode step's dense projections and SwiGLU experts through the GEMV kernel: which products
take it (with the kernel stood in for), and that the kernel equals cuBLAS and the unfused
expert path: on a GPU with Triton, or on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, which the test suite sets where there is no GPU)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from moegpt.model import KVCache, Transformer
from moegpt.model import expert_gemv as gemv
from moegpt.model.attention import Attention
from moegpt.model.feed_forward import FeedForward
from moegpt.model.moe import MoE
from moegpt.model.rope import rope_cos_sin
from tests.conftest import small_config

GPU = torch.cuda.is_available() and gemv.triton is not None


def _interpreter_runs() -> bool:
    """Whether Triton's interpreter runs a kernel through ``torch.library.wrap_triton`` here (a
    copy with a loop over a scalar argument): torch takes the interpreter's kernels from 2.13,
    and Triton's interpreter takes numpy 2's scalars from 3.7. A property of the environment,
    so the GEMV kernels' own tests can still fail."""
    if gemv.triton is None or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    tl = gemv.tl

    @gemv.triton.jit
    def copy(src, dst, n, BLOCK: tl.constexpr):
        for start in range(0, n, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            tl.store(dst + offsets, tl.load(src + offsets, mask=offsets < n), mask=offsets < n)

    src, dst = torch.arange(6.0), torch.zeros(6)
    try:
        torch.library.wrap_triton(copy)[(1,)](src, dst, 6, BLOCK=4)
    except Exception:  # any failure of the environment's pieces: the kernels' tests skip
        return False
    return torch.equal(src, dst)


INTERPRETED = not GPU and _interpreter_runs()
# Where the kernel itself runs: a GPU, else the CPU through the interpreter, else nowhere.
DEVICE = "cuda" if GPU else "cpu"
needs_kernel = pytest.mark.skipif(
    not (GPU or INTERPRETED), reason="the Triton kernel runs on CUDA or in its interpreter"
)


@pytest.fixture
def kernel(monkeypatch) -> None:
    """On the CPU, let the real kernel apply (through the interpreter), as it does on CUDA."""
    if not GPU:
        monkeypatch.setattr(gemv, "kernel_applies", gemv.kernel_reads)


@pytest.fixture
def kernel_calls(monkeypatch) -> list[tuple[int, tuple[int, ...]]]:
    """Make the kernel 'apply' on CPU, standing in for it with F.linear, and record each call's
    rows and weight shape."""
    calls: list[tuple[int, tuple[int, ...]]] = []

    def stand_in(x: torch.Tensor, weight: torch.Tensor, fp32_out: bool) -> torch.Tensor:
        assert x.dtype == weight.dtype
        calls.append((x.shape[0], tuple(weight.shape)))
        if fp32_out:
            calls.append(("fp32 sums of", x.dtype))
            return F.linear(x.float(), weight.float())
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


def test_hooks_of_a_layer_run_when_the_kernel_does(kernel_calls) -> None:
    """Tensor-parallel serving sums a row-parallel layer's output in a forward hook: a
    decode step through the kernel must still run it."""
    config = small_config(n_heads=4, n_kv_heads=1)
    attn, ffn = Attention(config, layer_idx=0), FeedForward(config, hidden=64)
    attn.fuse_projections()
    seen: list[str] = []
    attn.wo.register_forward_hook(lambda *_: seen.append("wo"))
    ffn.w2.register_forward_hook(lambda *_: seen.append("w2"))
    with torch.inference_mode():
        attn(torch.randn(1, 1, config.d_model), *rope_cos_sin(torch.arange(1), 8, 10000.0))
        ffn(torch.randn(1, 1, config.d_model))
    assert seen == ["wo", "w2"] and len(kernel_calls) == 5


def test_the_router_of_a_decode_step_takes_the_kernel_in_fp32(kernel_calls) -> None:
    config = small_config(n_experts=4)
    moe = MoE(config).to(torch.bfloat16)
    with torch.inference_mode():
        logits, *_ = moe.router(torch.randn(1, config.d_model, dtype=torch.bfloat16))
    # the gate reads the bf16 rows and weights (no cast kernels) and keeps its sums in fp32
    assert kernel_calls == [(1, (4, config.d_model)), ("fp32 sums of", torch.bfloat16)]
    assert logits.dtype == torch.float32


def test_decode_experts_run_gate_up_and_activation_in_one_call(monkeypatch) -> None:
    """A decode step's routed rows (in token order) take the gated kernel once for w1 and w3,
    then the plain one for w2; the stand-ins compute what the kernels must."""
    calls: list[str] = []

    def gated(x, gate, up, ids):
        calls.append("gated")
        return F.silu(torch.bmm(gate[ids], x.unsqueeze(-1))) * torch.bmm(up[ids], x.unsqueeze(-1))

    def plain(x, weight, ids):
        calls.append("plain")
        return torch.bmm(weight[ids], x.unsqueeze(-1)).squeeze(-1)

    monkeypatch.setattr(gemv, "kernel_applies", lambda x, w: True)
    monkeypatch.setattr(gemv, "_gated_expert_gemv", lambda *a: gated(*a).squeeze(-1), raising=False)
    monkeypatch.setattr(gemv, "_expert_gemv", plain, raising=False)
    monkeypatch.setattr(  # the router's gate
        gemv, "_dense_gemv", lambda x, w, fp32: F.linear(x.float(), w.float()), raising=False
    )
    moe = MoE(small_config(n_experts=4, top_k=2)).eval()
    moe.experts.use_grouped_mm = True  # the decode path CUDA graphs capture
    x = torch.randn(1, 1, 32)
    with torch.inference_mode():
        routed, _ = moe(x)
        calls_routed = list(calls)
        moe.experts.max_gathered_slots = 0  # the sorted, grouped path (no kernel)
        monkeypatch.setattr(gemv, "kernel_applies", lambda x, w: False)
        grouped, _ = moe(x)
    assert calls_routed == ["gated", "plain"]
    torch.testing.assert_close(routed, grouped, rtol=1e-5, atol=1e-6)


def test_sharded_weights_run_as_their_modules(kernel_calls) -> None:
    class Sharded(torch.Tensor):  # any tensor subclass (a DTensor) keeps its module's call
        pass

    weight = torch.randn(16, 32).as_subclass(Sharded)
    with torch.inference_mode():
        assert not gemv.dense_gemv_applies(torch.randn(1, 32), weight)
        assert gemv.dense_gemv_applies(torch.randn(1, 32), torch.randn(16, 32))


@needs_kernel
def test_the_kernel_leaves_float64_alone() -> None:
    """It sums in fp32: a float64 model keeps cuBLAS's float64."""
    x = torch.randn(1, 8, dtype=torch.float64, device=DEVICE)
    assert not gemv.kernel_reads(x, torch.randn(4, 8, dtype=torch.float64, device=DEVICE))
    assert gemv.kernel_reads(x.float(), torch.randn(4, 8, device=DEVICE))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
# The interpreter runs each program in Python: on the CPU, the shapes that test the masks.
@pytest.mark.parametrize(
    "shape", [(2304, 2048), (1024, 1024), (1001, 520)] if GPU else [(1001, 520), (130, 72)]
)
def test_dense_gemv_equals_cublas(rows: int, shape: tuple[int, int], kernel) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) * 0.02
    x = torch.randn(rows, shape[1], device=DEVICE, dtype=torch.bfloat16)
    want = x.float() @ weight.float().T
    with torch.inference_mode():  # a decode step's: training products never take the kernel
        assert gemv.dense_gemv_applies(x, weight) == (rows <= gemv.DENSE_GEMV_MAX_ROWS)
        got = gemv.dense_gemv(x, weight).float()
        summed = gemv.dense_gemv(x, weight, fp32_out=True)
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert summed.dtype == torch.float32
    assert ((summed - want).norm() / want.norm()).item() < 1e-5


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("fused", [False, True])
def test_gated_expert_gemv_equals_its_parts(rows: int, fused: bool, kernel) -> None:
    """Odd output counts (the row mask), and gate and up as slices of one tensor."""
    torch.manual_seed(0)
    n_out, n_in = (1001, 520) if GPU else (131, 72)  # odd sizes; small for the interpreter
    if fused:
        both = torch.randn(8, 2 * n_out, n_in, device=DEVICE, dtype=torch.bfloat16) * 0.05
        gate, up = both[:, :n_out], both[:, n_out:]
    else:
        gate, up = (
            torch.randn(8, n_out, n_in, device=DEVICE, dtype=torch.bfloat16) * 0.05 for _ in "ab"
        )
    x = torch.randn(rows, n_in, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (rows,), device=DEVICE)
    a = torch.einsum("soi,si->so", gate[ids].float(), x.float())
    b = torch.einsum("soi,si->so", up[ids].float(), x.float())
    want = F.silu(a) * b
    got = gemv.gated_expert_gemv(x, gate, up, ids).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@needs_kernel
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_decode_steps_with_the_kernel_equal_the_full_forward(batch: int, kernel) -> None:
    """A prompt, then one token at a time through the KV cache (rows through the kernel),
    against one forward over the whole sequence (cuBLAS), for a dense and an MoE model."""
    torch.manual_seed(0)
    for experts in (0, 4):
        width = 256 if GPU else 64  # the interpreter's programs run in Python
        config = small_config(d_model=width, n_heads=4, n_kv_heads=1, n_experts=experts)
        model = Transformer(config).to(DEVICE, torch.bfloat16).eval()
        model.fuse_projections()
        for module in model.modules():  # as on CUDA in bf16: decode rows take the kernel
            if hasattr(module, "use_grouped_mm"):
                module.use_grouped_mm = True
        tokens = torch.randint(0, config.vocab_size, (batch, 12), device=DEVICE)
        cache = KVCache.for_model(model, batch_size=batch, max_len=16)
        with torch.inference_mode():
            full = model(tokens).logits.float()
            steps = [model(tokens[:, :8], cache=cache).logits[:, -1:]]
            steps += [model(tokens[:, i : i + 1], cache=cache).logits for i in range(8, 12)]
        decoded = torch.cat(steps, dim=1).float()
        want = full[:, 7:]
        assert ((decoded - want).norm() / want.norm()).item() < 2e-2
