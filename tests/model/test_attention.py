"""Attention and the whole model: GQA/MQA = explicit MHA, causality, KV-cache decoding."""

from __future__ import annotations

import math

import pytest
import torch

from moegpt.model import KVCache, Transformer
from moegpt.model.attention import Attention
from moegpt.model.rope import apply_rope, rope_cos_sin
from tests.conftest import small_config


def explicit_mha(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Multi-head attention written out: K/V heads repeated for their query groups."""
    b, t, _ = x.shape
    d = attn.head_dim
    h, hkv = attn.wq.weight.shape[0] // d, attn.wk.weight.shape[0] // d
    q = (x @ attn.wq.weight.T).view(b, t, h, d).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(b, t, hkv, d).transpose(1, 2)
    v = (x @ attn.wv.weight.T).view(b, t, hkv, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(b, t, h * d)
    return out @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_query_attention_equals_explicit_multi_head(n_kv_heads: int) -> None:
    attn = Attention(small_config(n_heads=4, n_kv_heads=n_kv_heads), layer_idx=0)
    x = torch.randn(2, 9, 32)
    cos, sin = rope_cos_sin(torch.arange(9), 8, 10000.0)
    torch.testing.assert_close(attn(x, cos, sin), explicit_mha(attn, x, cos, sin))


def test_rope_is_identity_at_zero_and_relative() -> None:
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rotated(x, pos):
        cos, sin = rope_cos_sin(torch.tensor([pos]), 16, 10000.0)
        return apply_rope(x, cos, sin)

    torch.testing.assert_close(rotated(q, 0), q)
    dots = [(rotated(q, m) * rotated(k, m - 3)).sum().item() for m in (3, 10, 50)]
    assert dots == pytest.approx([dots[0]] * 3, rel=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_kv_heads": 2},
        {"n_experts": 0},
        {"first_k_dense": 1, "tie_embeddings": True},
        {"capacity_factor": 0.5},  # capacity drops only in training: inference stays causal
    ],
)
def test_model_is_causal(overrides: dict) -> None:
    model = Transformer(small_config(**overrides)).eval()
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    # Not bitwise: the expert matmuls see differently sized token groups (BLAS blocking).
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize(
    "overrides", [{"n_kv_heads": 1}, {"n_kv_heads": 2, "capacity_factor": 1.0}]
)
@pytest.mark.parametrize("chunks", [[16], [5, 1, 1, 1, 8], [1] * 16, [7, 9]])
def test_cached_decoding_gives_full_forward_logits(overrides: dict, chunks: list[int]) -> None:
    config = small_config(**overrides)
    model = Transformer(config).eval()
    tokens = torch.randint(0, 97, (3, 16))
    cache = KVCache.for_model(model, batch_size=3, max_len=20)
    pieces, start = [], 0
    with torch.no_grad():
        full = model(tokens).logits
        for n in chunks:
            pieces.append(model(tokens[:, start : start + n], cache=cache).logits)
            start += n
    assert cache.seq_len == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_misuse_is_an_error() -> None:
    model = Transformer(small_config())
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"holds \(batch, kv_heads\) = \(1, 1\), got \(2, 1\)"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)


def test_cache_follows_the_model_dtype() -> None:
    model = Transformer(small_config()).to(torch.bfloat16).eval()
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    assert cache.k.dtype == torch.bfloat16
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.seq_len == 4


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batches_give_empty_logits(shape: tuple[int, int]) -> None:
    out = Transformer(small_config())(torch.zeros(shape, dtype=torch.long))
    assert out.logits.shape == (*shape, 97)
    assert torch.isfinite(out.aux_loss)


def test_explicit_positions_match_the_default() -> None:
    model = Transformer(small_config()).eval()
    tokens = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        default = model(tokens).logits
        explicit = model(tokens, positions=torch.arange(6).expand(2, 6)).logits
    torch.testing.assert_close(default, explicit)


def test_aux_loss_is_the_mean_over_moe_layers() -> None:
    model = Transformer(small_config(n_layers=3, first_k_dense=1))
    out = model(torch.randint(0, 97, (2, 8)))
    assert len(out.moe_stats) == 2
    expected = (out.moe_stats[0].aux_loss + out.moe_stats[1].aux_loss) / 2
    torch.testing.assert_close(out.aux_loss, expected)
    dense = Transformer(small_config(n_experts=0))(torch.randint(0, 97, (1, 4)))
    assert dense.moe_stats == [] and dense.aux_loss.item() == 0.0


def test_document_mask_makes_packed_documents_independent() -> None:
    model = Transformer(small_config()).eval()
    first, second = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    packed = torch.cat([first, second], dim=1)
    document_ids = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    with torch.no_grad():
        together = model(packed, positions=positions, document_ids=document_ids).logits
        alone = model(second).logits
        leaky = model(packed).logits
    torch.testing.assert_close(together[:, 5:], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky[:, 5:], alone, atol=1e-3)


def test_fused_projections_compute_the_same_and_keep_the_weights_and_their_names() -> None:
    """Serving reads Q, K and V with one matmul; the weights stay the module's parameters
    (views of the fused matrix), so the state dict and in-place updates are unchanged, a
    conversion or a load that replaces the weights is fused again, and with gradients on
    the three projections still get theirs."""
    torch.manual_seed(0)
    model = Transformer(small_config(n_kv_heads=2)).double().eval()
    tokens = torch.randint(model.config.vocab_size, (2, 9))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        want = model(tokens).logits
    model.fuse_projections()
    attention = model.layers["0"].attention

    def fused_logits() -> torch.Tensor:
        with torch.no_grad():
            return model(tokens).logits

    torch.testing.assert_close(fused_logits(), want, rtol=1e-12, atol=1e-12)
    after = model.state_dict()
    assert after.keys() == before.keys() and "qkv_weight" not in after
    assert all(torch.equal(after[name], t) for name, t in before.items())
    with torch.no_grad():
        attention.wk.weight.mul_(0.5)  # as an optimizer step would
    assert not torch.allclose(fused_logits(), want)
    model.load_state_dict(before, assign=True)  # new storage for every weight
    torch.testing.assert_close(fused_logits(), want, rtol=1e-12, atol=1e-12)
    model.float()  # a conversion copies the weights and the matrix apart
    assert attention.qkv_weight.dtype == torch.float32
    assert attention.wq.weight.data_ptr() == attention.qkv_weight.data_ptr()
    torch.testing.assert_close(fused_logits().double(), want, rtol=1e-4, atol=1e-4)
    model(tokens).logits.square().sum().backward()  # gradients on: the three projections
    assert all(p.weight.grad is not None for p in (attention.wq, attention.wk, attention.wv))
