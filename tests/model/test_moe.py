"""The MoE layer against a naive per-token reference, in outputs and gradients (fp32)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moegpt.model.moe import GroupedExperts, MoE, top_k
from tests.conftest import small_config

CUDA = torch.cuda.is_available()


def reference_moe(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Every token through its top-k experts one at a time, weighted; drops past ``capacity``
    slots per expert in token order."""
    gate = moe.router.gate.weight
    experts = moe.experts
    flat = x.reshape(-1, x.shape[-1])
    used = [0] * moe.n_experts
    rows = []
    for token in flat:
        probs = torch.softmax(token @ gate.T, dim=-1)
        top_p, top_e = probs.topk(moe.top_k)
        top_p = top_p / top_p.sum()
        out = torch.zeros_like(token)
        for p, e in zip(top_p, top_e.tolist(), strict=True):
            if capacity is not None:
                if used[e] >= capacity:
                    continue
                used[e] += 1
            if experts.activation == "swiglu":
                hidden = F.silu(experts.w1[e] @ token) * (experts.w3[e] @ token)
            else:
                hidden = F.gelu(experts.w1[e] @ token)
            out = out + p * (experts.w2[e] @ hidden)
        rows.append(out)
    return torch.stack(rows).view_as(x)


def _grads(moe: MoE, x: torch.Tensor, out: torch.Tensor, upstream: torch.Tensor) -> list:
    return torch.autograd.grad(out, [x, *moe.parameters()], upstream, allow_unused=True)


@pytest.mark.parametrize(
    ("seed", "batch", "seq", "experts", "top_k", "activation"),
    [
        (0, 2, 5, 4, 2, "swiglu"),
        (1, 1, 13, 8, 2, "swiglu"),
        (2, 3, 4, 16, 4, "swiglu"),
        (3, 2, 7, 4, 1, "gelu"),
        (4, 1, 3, 8, 2, "gelu"),  # 6 routed slots over 8 experts: some experts get nothing
    ],
)
def test_moe_matches_per_token_reference(seed, batch, seq, experts, top_k, activation) -> None:
    torch.manual_seed(seed)
    moe = MoE(small_config(n_experts=experts, top_k=top_k, activation=activation))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(batch, seq, 32, requires_grad=True)
    upstream = torch.randn(batch, seq, 32)

    out, stats = moe(x)
    expected = reference_moe(moe, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(
        _grads(moe, x, out, upstream), _grads(moe, x, expected, upstream), strict=True
    ):
        if want is None:  # e.g. an expert no token reached: no gradient path in the reference
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert int(stats.tokens_per_expert.sum()) == batch * seq * top_k
    if seed == 4:
        assert (stats.tokens_per_expert == 0).any()


def test_experts_with_no_tokens_get_zero_gradient() -> None:
    moe = MoE(small_config(n_experts=8, top_k=1))
    x = torch.randn(1, 2, 32)
    out, stats = moe(x)
    out.square().sum().backward()
    idle = stats.tokens_per_expert == 0
    assert idle.sum() >= 6
    assert torch.count_nonzero(moe.experts.w1.grad[idle]) == 0
    assert torch.count_nonzero(moe.experts.w2.grad[idle]) == 0


def test_grouped_mm_path_equals_loop_path() -> None:
    moe = MoE(small_config(n_experts=8, top_k=2))
    x = torch.randn(2, 9, 32, requires_grad=True)
    upstream = torch.randn(2, 9, 32)
    results = []
    for grouped in (False, True):
        moe.experts.use_grouped_mm = grouped
        out, _ = moe(x)
        results.append((out, _grads(moe, x, out, upstream)))
    (loop_out, loop_grads), (gmm_out, gmm_grads) = results
    torch.testing.assert_close(gmm_out, loop_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(gmm_grads, loop_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="GPU"))]
)
def test_compiled_grouped_experts_take_an_empty_buffer(device: str) -> None:
    """An expert-parallel rank that receives no slots runs its experts on zero rows: compiled,
    in bf16, the output is empty and the weights' gradients are zeros (on CUDA the compiled
    grouped GEMM refused inductor's empty buffer, and a four-GPU run failed)."""
    experts = GroupedExperts(small_config(n_experts=4, d_model=32)).to(device, torch.bfloat16)
    experts.use_grouped_mm = True
    x = torch.zeros(0, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    counts = torch.zeros(4, dtype=torch.long, device=device)
    out = torch.compile(experts, dynamic=True)(x, counts)
    out.float().sum().backward()
    assert out.shape == (0, 32)
    assert x.grad.shape == (0, 32)
    for weight in experts.weights().values():
        assert torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_factor_drops_over_capacity_in_token_order(capacity_factor: float) -> None:
    torch.manual_seed(7)
    moe = MoE(small_config(n_experts=4, top_k=2, capacity_factor=capacity_factor))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 11, 32)
    out, stats = moe(x)
    slots = 2 * 11 * 2
    capacity = math.ceil(capacity_factor * slots / 4)
    torch.testing.assert_close(out, reference_moe(moe, x, capacity), rtol=1e-5, atol=1e-5)
    kept = stats.tokens_per_expert.clamp(max=capacity).sum().item()
    assert stats.dropped_fraction.item() == pytest.approx(1 - kept / slots)


def test_dropless_drops_nothing() -> None:
    moe = MoE(small_config())
    _, stats = moe(torch.randn(3, 8, 32))
    assert stats.dropped_fraction.item() == 0.0


def test_aux_losses_closed_form_for_a_uniform_router() -> None:
    """A zero gate gives uniform probabilities: balance loss E * sum_e f_e / E = 1, z = ln(E)^2."""
    moe = MoE(small_config(n_experts=8, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.25))
    torch.nn.init.zeros_(moe.router.gate.weight)
    _, stats = moe(torch.randn(2, 6, 32))
    assert stats.load_balance_loss.item() == pytest.approx(1.0, rel=1e-6)
    assert stats.z_loss.item() == pytest.approx(math.log(8) ** 2, rel=1e-6)
    assert stats.aux_loss.item() == pytest.approx(0.5 + 0.25 * math.log(8) ** 2, rel=1e-6)


def test_balance_loss_matches_switch_formula_and_trains_the_router() -> None:
    moe = MoE(small_config(n_experts=4, top_k=2))
    x = torch.randn(4, 5, 32)
    _, stats = moe(x)
    logits = x.reshape(-1, 32) @ moe.router.gate.weight.T
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.topk(2).indices.reshape(-1), minlength=4).float()
    expected = 4 * ((counts / counts.sum()) * probs.mean(0)).sum()
    assert stats.load_balance_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    stats.aux_loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_grouped_mm_path_in_bf16_agrees_with_the_loop() -> None:
    moe = MoE(small_config(n_experts=8, top_k=2)).to(torch.bfloat16)
    x = torch.randn(2, 9, 32, dtype=torch.bfloat16)
    outs = []
    for grouped in (False, True):
        moe.experts.use_grouped_mm = grouped
        outs.append(moe(x)[0].float())
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)


def test_capacity_applies_only_in_training() -> None:
    moe = MoE(small_config(n_experts=4, top_k=2, capacity_factor=0.5))
    x = torch.randn(2, 11, 32)
    moe.eval()
    out, stats = moe(x)
    assert stats.dropped_fraction.item() == 0.0
    torch.testing.assert_close(out, reference_moe(moe, x), rtol=1e-5, atol=1e-5)
    moe.train()
    assert moe(x)[1].dropped_fraction.item() > 0


@pytest.mark.parametrize("renormalize", [True, False])
def test_top1_router_learns_from_the_output_only_without_renormalisation(renormalize) -> None:
    moe = MoE(small_config(top_k=1, router_renormalize=renormalize))
    out, _ = moe(torch.randn(2, 5, 32))
    out.square().sum().backward()
    grad = moe.router.gate.weight.grad.abs().max().item()
    if renormalize:  # every weight is 1.0: the LM loss cannot move the router
        assert grad < 1e-6
    else:
        assert grad > 1e-3


@pytest.mark.parametrize("tokens", [1, 3, 4])
def test_gathered_inference_path_equals_grouped_path(tokens: int) -> None:
    """A decode step's few slots run as gathered per-slot GEMVs, which must compute what the
    grouped GEMM computes (fp32, where both run on CPU)."""
    moe = MoE(small_config(n_experts=8, top_k=2)).eval()
    moe.experts.use_grouped_mm = True
    moe.experts.max_gathered_slots = 8  # every case here gathers
    x = torch.randn(1, tokens, 32)
    with torch.inference_mode():
        gathered, _ = moe(x)
        moe.experts.max_gathered_slots = 0
        grouped, _ = moe(x)
    torch.testing.assert_close(gathered, grouped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered, reference_moe(moe, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_top_k_by_max_reductions_equals_topk_and_passes_the_same_gradient(k: int) -> None:
    logits = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(dim=-1)
    values, ids = top_k(probs, k)
    want_values, want_ids = probs.topk(k, dim=-1)
    assert torch.equal(ids, want_ids) and torch.equal(values, want_values)
    weights = torch.randn(37, k, dtype=torch.float64)
    (grad,) = torch.autograd.grad((values * weights).sum(), logits, retain_graph=True)
    (want,) = torch.autograd.grad((want_values * weights).sum(), logits)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5, 1.25])
def test_padding_is_routed_but_left_out_of_the_statistics_and_takes_slots_last(
    capacity_factor: float,
) -> None:
    """Row 0 holds 4 tokens and 12 of padding (one token repeated, as a packer pads), row 1
    16 tokens. The statistics equal those of the real tokens alone; under a capacity limit
    the real tokens keep the slots they would have if the padding came after all of them."""
    torch.manual_seed(3)
    moe = MoE(small_config(n_experts=4, top_k=2, capacity_factor=capacity_factor))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 32)
    x[0, 4:] = x[0, 3]
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[0, 4:] = True
    out, stats = moe(x, padding)
    real = x[~padding]
    alone = MoE(small_config(n_experts=4, top_k=2))
    alone.load_state_dict(moe.state_dict())
    _, want = alone(real[None])
    for name in ("tokens_per_expert", "load_balance_loss", "z_loss", "aux_loss"):
        torch.testing.assert_close(getattr(stats, name), getattr(want, name))
    # the padding moved after every real token: same slots, same capacity
    last = torch.cat([real, x[padding]])[None]
    reordered, _ = moe(last)
    torch.testing.assert_close(out[~padding], reordered[0, : len(real)])
    if capacity_factor:
        capacity = math.ceil(capacity_factor * 2 * 16 * 2 / 4)
        kept = stats.tokens_per_expert.clamp(max=capacity).sum()
        assert stats.dropped_fraction.item() == pytest.approx(1 - kept.item() / (20 * 2))
        assert (stats.dropped_fraction.item() > 0) == (capacity_factor < 1)  # 0.5 drops some
    else:
        assert stats.dropped_fraction.item() == 0.0
