"""Flamingo-style vision (model/vision.py): closed gates leave the language model's logits
exactly as they were; media masking equals a per-token reference loop, also for sequences
without images; and once the gates open, each token's output depends on its own image only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moegpt.config import ConfigError, VisionConfig
from moegpt.model import Transformer
from moegpt.model.vision import GatedCrossAttentionBlock, VisionLanguageModel, media_mask
from tests.conftest import small_config, small_vision_config

IMAGE = 5  # the <|image|> id in these tests' vocabulary
VISION = small_vision_config()


def tokens_with_images(batch_images: list[list[int]], seq: int = 12) -> torch.Tensor:
    """Random text with <|image|> markers at the given positions, one list per sequence."""
    tokens = torch.randint(6, 97, (len(batch_images), seq))
    for row, places in enumerate(batch_images):
        tokens[row, places] = IMAGE
    return tokens


def open_gates(model: VisionLanguageModel) -> None:
    with torch.no_grad():
        for block in model.xattn.values():
            block.attention_gate.fill_(0.7)
            block.ffn_gate.fill_(-0.4)


def test_closed_gates_give_the_language_models_logits_exactly() -> None:
    lm = Transformer(small_config()).eval()
    model = VisionLanguageModel(lm, VISION, IMAGE).eval()
    tokens = tokens_with_images([[0, 7], [3], []])
    images = torch.randn(3, 2, 1, 8, 8)
    with torch.no_grad():
        alone = lm(tokens).logits
        assert torch.equal(model(tokens, images).logits, alone)
        open_gates(model)
        assert not torch.allclose(model(tokens, images).logits, alone)


def reference_mask(
    tokens: torch.Tensor, images: int, per_image: int, documents: torch.Tensor | None = None
) -> torch.Tensor:
    """Per token, by walking the sequence: the visual tokens of the latest image so far in
    the token's document (images numbered in row order)."""
    batch, seq = tokens.shape
    mask = torch.zeros(batch, seq, images * per_image, dtype=torch.bool)
    for b in range(batch):
        seen, latest = 0, None
        for t in range(seq):
            if documents is not None and t and documents[b, t] != documents[b, t - 1]:
                latest = None  # a new document sees none of the earlier ones' images
            if tokens[b, t] == IMAGE:
                latest, seen = seen, seen + 1
            if latest is not None:
                mask[b, t, latest * per_image : (latest + 1) * per_image] = True
    return mask


@pytest.mark.parametrize("places", [[[0, 5, 9], [2], []], [[], []], [[11], [0, 1, 2]]])
def test_media_mask_matches_a_per_token_loop(places) -> None:
    tokens = tokens_with_images(places)
    mask, has_media = media_mask(tokens, IMAGE, images_per_sequence=3, tokens_per_image=4)
    expected = reference_mask(tokens, 3, 4)
    assert torch.equal(mask[:, 0], expected)
    assert torch.equal(has_media, expected.any(-1))


def test_packed_documents_see_only_their_own_images() -> None:
    """Rows packing several documents, e.g. [doc 0: image, text | doc 1: text only | doc 2:
    image, text]; a token's image is the latest one of its own document."""
    tokens = tokens_with_images([[0, 6, 9], [2], [4, 5]], seq=12)
    documents = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2],
            [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2],
            [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2],
        ]
    )
    mask, has_media = media_mask(tokens, IMAGE, 3, 2, documents)
    expected = reference_mask(tokens, 3, 2, documents)
    assert torch.equal(mask[:, 0], expected)
    assert torch.equal(has_media, expected.any(-1))
    assert not has_media[0, 3:6].any()  # document 1 follows an image but has none of its own


def test_a_marker_without_its_image_is_refused() -> None:
    with pytest.raises(ValueError, match="2 <\\|image\\|> tokens but only 1 images"):
        media_mask(tokens_with_images([[1, 4]]), IMAGE, images_per_sequence=1, tokens_per_image=2)


def test_cross_attention_equals_a_per_token_reference() -> None:
    """Each token's cross-attention output, computed alone over its own image's visual tokens
    (nothing before the first image), equals the batched, masked block's."""
    config = small_config()
    block = GatedCrossAttentionBlock(config, vision_width=16)
    with torch.no_grad():
        block.attention_gate.fill_(0.5)
        block.ffn_gate.fill_(0.0)  # the attention part alone
    tokens = tokens_with_images([[1, 6], [], [0]], seq=9)
    per_image, images = 3, 2
    x = torch.randn(3, 9, config.d_model)
    visual = torch.randn(3, images * per_image, 16)
    mask, has_media = media_mask(tokens, IMAGE, images, per_image)
    with torch.no_grad():
        batched = block(x, visual, mask, has_media)
        expected = x.clone()
        heads, head_dim = config.n_heads, config.d_model // config.n_heads
        for b in range(3):
            for t in range(9):
                seen = reference_mask(tokens[b : b + 1], images, per_image)[0, t]
                if not seen.any():
                    continue  # no image yet: the token passes through unchanged
                q = block.q(block.attention_norm(x[b, t])).view(heads, 1, head_dim)
                k = block.k(visual[b, seen]).view(-1, heads, head_dim).transpose(0, 1)
                v = block.v(visual[b, seen]).view(-1, heads, head_dim).transpose(0, 1)
                out = F.scaled_dot_product_attention(q, k, v).reshape(-1)
                expected[b, t] += torch.tanh(block.attention_gate) * block.wo(out)
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-6)


def test_each_token_sees_only_its_own_image() -> None:
    """Changing the second image changes the tokens from its marker on, and nothing before.
    (A dense language model: the CPU expert loop's matmul shapes follow the whole batch's
    routing, which would move earlier tokens' logits by rounding.)"""
    model = VisionLanguageModel(Transformer(small_config(n_experts=0)), VISION, IMAGE).eval()
    open_gates(model)
    tokens = tokens_with_images([[2, 7]])
    images = torch.randn(1, 2, 1, 8, 8)
    changed = images.clone()
    changed[0, 1] = torch.randn(1, 8, 8)
    with torch.no_grad():
        before, after = model(tokens, images).logits, model(tokens, changed).logits
    assert torch.equal(before[0, :7], after[0, :7])
    assert not torch.allclose(before[0, 7:], after[0, 7:])


def test_a_text_row_computes_the_same_with_or_without_images_beside_it() -> None:
    """Text passes the blocks' feed-forward layers either way (a batch without images encodes
    a blank one no token sees), so its logits do not depend on its neighbours."""
    model = VisionLanguageModel(Transformer(small_config(n_experts=0)), VISION, IMAGE).eval()
    open_gates(model)
    tokens = tokens_with_images([[3], []])
    with torch.no_grad():
        together = model(tokens, torch.randn(2, 1, 1, 8, 8)).logits[1]
        alone = model(tokens[1:]).logits[0]
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_the_language_model_can_stay_frozen_while_vision_learns() -> None:
    model = VisionLanguageModel(Transformer(small_config()), VISION, IMAGE)
    model.lm.requires_grad_(False)
    tokens = tokens_with_images([[0, 6], [3]])
    out = model(tokens, torch.randn(2, 2, 1, 8, 8))
    F.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is None for p in model.lm.parameters())
    # The gates start closed, so the gradient reaches them first (and the marker's embedding).
    assert all(block.attention_gate.grad.abs().sum() > 0 for block in model.xattn.values())
    assert model.image_embedding.grad.abs().sum() > 0


def test_vision_settings_are_validated_one_line_each() -> None:
    with pytest.raises(ConfigError, match="vision.image_size: 30 is not divisible by"):
        VisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="vision.width: 30 is not divisible by vision.heads"):
        VisionConfig(width=30, heads=4)
    with pytest.raises(ConfigError, match="vision.resampler_latents: must be positive"):
        VisionConfig(resampler_latents=0)


def test_masked_attention_never_runs_on_cudnn(monkeypatch) -> None:
    """Every masked attention (the cross-attention's media mask, the language model's document
    mask) goes through ``masked_attention``, which on a GPU turns cuDNN's kernel off for the
    call: torch 2.11's cuDNN backward returns NaN query gradients for some masked shapes on
    Hopper (pytorch/pytorch#196678). Elsewhere the caller's kernels stand."""
    import moegpt.model.attention as attention
    import moegpt.model.vision as vision

    class OnGpu(torch.Tensor):  # what masked_attention asks of its query, on a CPU
        @property
        def is_cuda(self) -> bool:
            return True

    seen: list[bool] = []
    real = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*[a.as_subclass(torch.Tensor) for a in args], **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 1, 5, 8)
    mask = torch.rand(1, 1, 3, 5) > 0.3
    mask[..., 0] = True
    expected = real(q, k, k, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(
        attention.masked_attention(q.as_subclass(OnGpu), k, k, mask), expected
    )
    torch.testing.assert_close(attention.masked_attention(q, k, k, mask), expected)
    assert seen == [False, True] and torch.backends.cuda.cudnn_sdp_enabled()

    calls: list[int] = []
    traced = attention.masked_attention

    def counting(*args):
        calls.append(1)
        return traced(*args)

    monkeypatch.setattr(attention, "masked_attention", counting)
    monkeypatch.setattr(vision, "masked_attention", counting)
    model = VisionLanguageModel(Transformer(small_config()), VISION, IMAGE)
    tokens = tokens_with_images([[0, 7], [3]])
    document_ids = torch.tensor([[0] * 6 + [1] * 6, [0] * 12])
    model(tokens, torch.randn(2, 2, 1, 8, 8), document_ids=document_ids)
    assert len(calls) == len(model.xattn) + small_config().n_layers
