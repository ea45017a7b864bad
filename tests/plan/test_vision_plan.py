"""Vision on paper (plan/vision.py): the closed-form parameter counts equal the built modules',
and the FLOPs equal what PyTorch's FLOP counter sees the modules do (attention through the
math kernel, which the counter can see into)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from moegpt.config import VisionConfig
from moegpt.model import Transformer
from moegpt.model.vision import VisionLanguageModel, media_mask
from moegpt.plan.vision import vision_flops, vision_params
from tests.conftest import small_config, small_vision_config

CONFIGS = [
    (small_config(), VisionConfig(enabled=True)),
    (
        small_config(n_experts=0, activation="gelu", n_layers=3),
        small_vision_config(
            patch_size=2,
            depth=3,
            resampler_latents=5,
            resampler_depth=2,
            max_frames=3,
            xattn_every=2,
        ),
    ),
    (small_config(), small_vision_config(objective="clip", clip_dim=24)),
]


def size(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("model_config", "vision"), CONFIGS)
def test_parameter_counts_equal_the_modules(model_config, vision) -> None:
    model = VisionLanguageModel(Transformer(model_config), vision, image_token_id=5)
    counted = vision_params(model_config, vision)
    assert counted.encoder == size(model.encoder)
    assert counted.resampler == size(model.resampler)
    assert counted.cross_attention == size(model.xattn)
    assert counted.total == size(model) - size(model.lm)


def flops(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize(("model_config", "vision"), CONFIGS)
def test_flops_equal_the_counters(model_config, vision) -> None:
    model = VisionLanguageModel(Transformer(model_config), vision, image_token_id=5)
    predicted = vision_flops(model_config, vision, seq_len=64, tokens_per_image=100)
    size = vision.image_size
    image = torch.randn(1, vision.channels, size, size)
    features = model.encoder(image).unsqueeze(1)
    assert flops(lambda: model.encoder(image)) == predicted.encoder_per_image
    assert flops(lambda: model.resampler(features)) == predicted.resampler_per_image
    visual = model.resampler(features)
    token = torch.randn(1, 1, model_config.d_model)
    mask, has_media = media_mask(torch.tensor([[5]]), 5, 1, vision.resampler_latents)
    per_block = [flops(lambda b=b: b(token, visual, mask, has_media)) for b in model.xattn.values()]
    # One token through every block: its own FLOPs plus the visual tokens' keys and values.
    assert sum(per_block) == predicted.xattn_per_token + predicted.visual_kv_per_image


def test_a_frozen_language_model_saves_only_its_weight_gradients() -> None:
    """Freezing the language model removes the weight-gradient matmuls (1x its matmuls); the
    attention products have no weights, and their backward still runs."""
    from moegpt.plan.flops import training_token_flops

    m, v, seq = small_config(), small_vision_config(), 64
    frozen = vision_flops(m, v, seq, tokens_per_image=10.0, lm_frozen=True)
    trained = vision_flops(m, v, seq, tokens_per_image=10.0, lm_frozen=False)
    token = training_token_flops(m, seq)
    assert token.attention > 0
    assert trained.stage_per_token - frozen.stage_per_token == pytest.approx(token.matmul)
