"""Stage (a) of vision, CLIP's objective (`vision.objective = "clip"`): the contrastive loss
against CLIP's own formula and a per-row reference, captions found as a per-token walk finds
them, and a tiny encoder that learns to tell images apart by their captions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moegpt.model import Transformer
from moegpt.model.vision import (
    ContrastiveHeads,
    VisionLanguageModel,
    _caption_signatures,
    caption_count,
    caption_owners,
)
from tests.conftest import small_config, small_vision_config

IMAGE = 5


def heads_and_features(n: int, seed: int = 0):
    torch.manual_seed(seed)
    heads = ContrastiveHeads(16, 24, 8)
    return heads, torch.randn(n, 16), torch.randn(n, 24)


def test_distinct_captions_give_clips_symmetric_cross_entropy() -> None:
    heads, images, captions = heads_and_features(6)
    loss = heads(images, captions, torch.arange(6), torch.ones(6, dtype=torch.bool))
    x = F.normalize(images @ heads.image_projection.weight.T, dim=-1)
    y = F.normalize(captions @ heads.text_projection.weight.T, dim=-1)
    logits = math.exp(heads.logit_scale.item()) * x @ y.T
    labels = torch.arange(6)
    expected = (
        F.cross_entropy(logits, labels, reduction="sum")
        + F.cross_entropy(logits.T, labels, reduction="sum")
    ) / 2
    torch.testing.assert_close(loss, expected)


def test_images_that_share_a_caption_are_all_positives() -> None:
    """Each row's target is spread evenly over the pairs with its caption, in both
    directions (a per-row loop is the reference)."""
    heads, images, captions = heads_and_features(5, seed=1)
    signatures = torch.tensor([7, 3, 7, 9, 3])
    loss = heads(images, captions, signatures, torch.ones(5, dtype=torch.bool))
    x = F.normalize(heads.image_projection(images), dim=-1)
    y = F.normalize(heads.text_projection(captions), dim=-1)
    logits = heads.logit_scale.exp() * x @ y.T
    expected = torch.zeros(())
    for i in range(5):
        positives = [j for j in range(5) if signatures[j] == signatures[i]]
        for j in positives:
            expected -= logits[i].log_softmax(0)[j] / len(positives) / 2
            expected -= logits[:, i].log_softmax(0)[j] / len(positives) / 2
    torch.testing.assert_close(loss, expected)


def test_the_loss_is_fp32_under_bf16_autocast() -> None:
    """As training on a GPU runs it: the scores' matmul stays fp32 (bf16 could not hold the
    mask's fill), so the loss equals the one without autocast."""
    heads, images, captions = heads_and_features(6, seed=3)
    valid = torch.tensor([True, True, False, True, True, True])
    plain = heads(images, captions, torch.arange(6), valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = heads(images, captions, torch.arange(6), valid)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    torch.testing.assert_close(mixed, plain, rtol=2e-2, atol=0)  # bf16 projections


def test_slots_without_a_caption_change_nothing() -> None:
    heads, images, captions = heads_and_features(7, seed=2)
    valid = torch.tensor([True, False, True, True, False, True, True])
    signatures = torch.arange(7)
    loss = heads(images, captions, signatures, valid)
    kept = heads(images[valid], captions[valid], signatures[valid], valid[valid])
    torch.testing.assert_close(loss, kept)
    loss.backward()
    assert torch.isfinite(heads.image_projection.weight.grad).all()


def owners_by_walking(tokens: torch.Tensor, documents: torch.Tensor, slots: int) -> torch.Tensor:
    """The reference: walk each row, numbering its images, and mark a token as the caption of
    the latest image of its own document, unless it is a marker."""
    out = torch.zeros(*tokens.shape, slots, dtype=torch.bool)
    for b in range(tokens.shape[0]):
        seen, current, document = 0, None, None
        for s in range(tokens.shape[1]):
            if documents[b, s] != document:
                document, current = documents[b, s], None
            if tokens[b, s] == IMAGE:
                current, seen = seen, seen + 1
            elif current is not None:
                out[b, s, current] = True
    return out


def test_captions_are_the_text_after_each_marker_within_its_document() -> None:
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(6, 90, (3, 16), generator=generator)
    tokens[0, [0, 5, 6, 12]] = IMAGE  # two markers in a row: the first has no caption
    tokens[1, [3, 15]] = IMAGE  # the last marker ends the row: no caption
    documents = torch.tensor([[0] * 9 + [1] * 7, [0] * 8 + [1] * 8, [0] * 16])
    owners = caption_owners(tokens, IMAGE, 4, documents)
    assert torch.equal(owners, owners_by_walking(tokens, documents, 4))
    # row 0: the markers at 0, 6 (its document ends at 9) and 12; row 1: the one at 3
    assert caption_count(tokens, IMAGE, documents) == 4
    assert caption_count(tokens[2:], IMAGE) == 0


def test_caption_signatures_are_equal_exactly_for_equal_captions() -> None:
    caption, other = [11, 12, 13], [13, 12, 11]
    tokens = torch.tensor([[IMAGE, *caption, IMAGE, *caption, IMAGE, *other, IMAGE, 11, 12]])
    owners = caption_owners(tokens, IMAGE, 4)
    signatures = _caption_signatures(tokens, owners)[0].tolist()
    assert signatures[0] == signatures[1]  # the same text at another place in the row
    assert len({signatures[0], signatures[2], signatures[3]}) == 3  # reordered, or a prefix


def clip_model(**overrides) -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = small_vision_config(objective="clip", clip_dim=8, **overrides)
    return VisionLanguageModel(Transformer(small_config(n_experts=0)), vision, IMAGE)


def test_the_clip_objective_gives_gradients_to_the_encoder_and_heads_alone() -> None:
    model = clip_model()
    tokens = torch.randint(6, 90, (2, 12))
    tokens[:, [0, 6]] = IMAGE
    out = model(tokens, torch.randn(2, 2, 1, 8, 8))
    assert out.loss_sum is not None and out.logits.shape == (2, 12, model.lm.config.d_model)
    out.loss_sum.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith(("encoder.", "clip.")) for n in trained)
    assert "clip.logit_scale" in trained and "encoder.patch_embedding.weight" in trained


def test_a_batch_without_images_has_no_loss_but_runs_the_encoder() -> None:
    model = clip_model()
    out = model(torch.randint(6, 90, (2, 12)))
    assert out.loss_sum == 0
    out.loss_sum.backward()
    assert model.encoder.patch_embedding.weight.grad is not None  # same collectives under FSDP


@pytest.mark.parametrize("seed", [0, 1])
def test_the_encoder_learns_which_caption_an_image_has(seed: int) -> None:
    """Eight captions, each with its own image (a bright patch in one of eight places, plus
    noise): after training, each image's nearest caption in the joint space is its own, on
    fresh noise. Before training it is right for at most half of them."""
    torch.manual_seed(seed)
    model = clip_model(image_size=8, patch_size=2)
    captions = torch.randint(6, 90, (8, 4))

    def batch(noise_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(noise_seed)
        images = torch.rand(8, 1, 1, 8, 8, generator=generator) * 0.3
        for i in range(8):
            row, col = divmod(i, 4)
            images[i, 0, 0, row * 4 : row * 4 + 4, col * 2 : col * 2 + 2] += 1.0
        tokens = torch.cat([torch.full((8, 1), IMAGE), captions], dim=1)
        return tokens, images

    def retrieval(tokens: torch.Tensor, images: torch.Tensor) -> float:
        with torch.no_grad():
            pooled = model.encoder(images.flatten(0, 1)).mean(dim=1)
            states = model.lm(tokens, head=False).logits[:, 1:].mean(dim=1)
            x = F.normalize(model.clip.image_projection(pooled), dim=-1)
            y = F.normalize(model.clip.text_projection(states), dim=-1)
        return float(((x @ y.T).argmax(dim=1) == torch.arange(8)).float().mean())

    optimizer = torch.optim.AdamW(
        [p for n, p in model.named_parameters() if not n.startswith("lm.")], lr=3e-3
    )
    assert retrieval(*batch(10_000)) <= 0.5
    for step in range(300):
        loss = model(*batch(step)).loss_sum
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert retrieval(*batch(10_000)) == 1.0
    assert loss.item() < 0.5 * 8 * math.log(8)
