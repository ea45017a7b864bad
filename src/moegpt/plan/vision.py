"""Vision on paper: the parameters and FLOPs that model/vision.py adds to a language model, in
closed form (the tests hold the counts to the built modules), and the cost of a Flamingo
stage that trains them on ``tokens`` interleaved tokens with the language model frozen.

Stage FLOPs per text token, with 2 per multiply-accumulate and backward twice forward:
- the frozen language model: forward, plus the backward through its activations that the
  cross-attention blocks below the top need (weight gradients skipped): 2 x its forward;
- the cross-attention blocks (trained): 3 x their forward, which includes attending to one
  image's visual tokens;
- per image (one every ``tokens_per_image`` text tokens): the encoder's forward only (frozen,
  and nothing trains below it), the resampler's forward and backward (3x), and every block's
  key and value projections of the visual tokens (3x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moegpt.config import ModelConfig, VisionConfig
from moegpt.plan.flops import training_token_flops
from moegpt.plan.params import ffn_params, param_breakdown


def _layer_norm(width: int) -> int:
    return 2 * width


def _mlp(width: int) -> int:
    """LayerNorm, then width -> 4 width -> width with biases."""
    return _layer_norm(width) + (4 * width * width + 4 * width) + (4 * width * width + width)


def xattn_blocks(m: ModelConfig, v: VisionConfig) -> int:
    """Cross-attention blocks: one before layers 0, n, 2n, ..."""
    return math.ceil(m.n_layers / v.xattn_every)


@dataclass(frozen=True)
class VisionParams:
    encoder: int
    resampler: int
    cross_attention: int  # every block
    image_embedding: int
    contrastive_heads: int = 0  # the CLIP stage's projections and temperature (its runs only)

    @property
    def total(self) -> int:
        parts = self.encoder + self.resampler + self.cross_attention + self.image_embedding
        return parts + self.contrastive_heads

    @property
    def trained_in_flamingo_stage(self) -> int:
        """Everything but the encoder (pretrained before, frozen) and the language model."""
        return self.resampler + self.cross_attention + self.image_embedding


def vision_params(m: ModelConfig, v: VisionConfig) -> VisionParams:
    w, d = v.width, m.d_model
    encoder_block = _layer_norm(w) + (3 * w * w + 3 * w) + (w * w + w) + _mlp(w)
    encoder = (
        v.channels * v.patch_size**2 * w
        + w  # patch embedding (a strided convolution)
        + v.patches * w  # position embeddings
        + v.depth * encoder_block
        + _layer_norm(w)
    )
    resampler_block = 2 * _layer_norm(w) + w * w + 2 * w * w + w * w + _mlp(w)
    resampler = (
        (v.resampler_latents + v.max_frames) * w
        + v.resampler_depth * resampler_block
        + _layer_norm(w)
    )
    block = d + d * d + 2 * w * d + d * d + d + ffn_params(m, m.ffn_hidden) + 2  # 2 gates
    return VisionParams(
        encoder=encoder,
        resampler=resampler,
        cross_attention=xattn_blocks(m, v) * block,
        image_embedding=d,
        contrastive_heads=(w + d) * v.clip_dim + 1 if v.objective == "clip" else 0,
    )


@dataclass(frozen=True)
class VisionFlops:
    encoder_per_image: float  # forward
    resampler_per_image: float  # forward
    visual_kv_per_image: float  # forward: every block's K and V of the visual tokens
    xattn_per_token: float  # forward: every block, attention to one image included
    stage_per_token: float  # the Flamingo stage's training FLOPs per text token, images included
    clip_stage_per_token: float  # the CLIP stage's: the text tower's forward, encoder trained


def vision_flops(
    m: ModelConfig,
    v: VisionConfig,
    seq_len: int,
    tokens_per_image: float,
    lm_frozen: bool = True,
    encoder_frozen: bool = True,
) -> VisionFlops:
    """Forward FLOPs of each part, and a training step's per text token. A frozen language
    model still runs backward through its activations: its matmuls cost 2x forward (no
    weight gradients), its attention products, which have no weights, 3x as ever. A frozen
    encoder, first in line, runs forward only."""
    w, d, patches, latents = v.width, m.d_model, v.patches, v.resampler_latents
    encoder = patches * (
        2 * v.channels * v.patch_size**2 * w  # patch embedding
        + v.depth * (2 * (4 * w * w + 8 * w * w) + 4 * w * patches)  # matmuls, attention
    )
    keys = patches + latents  # the latents attend to the image (one frame) and themselves
    resampler = v.resampler_depth * (
        2 * latents * (w * w + w * w + 8 * w * w)  # q, output projection, MLP
        + 2 * keys * 2 * w * w  # keys and values
        + 4 * latents * keys * w  # attention
    )
    blocks = xattn_blocks(m, v)
    visual_kv = blocks * 2 * latents * 2 * w * d
    xattn = blocks * (2 * (2 * d * d + ffn_params(m, m.ffn_hidden)) + 4 * d * latents)
    token = training_token_flops(m, seq_len)
    forward = token.forward
    lm = 2 * token.matmul + 3 * token.attention if lm_frozen else 3 * forward
    per_image = (1 if encoder_frozen else 3) * encoder + 3 * (resampler + visual_kv)
    # CLIP: the frozen language model runs forward only, without its head (its final states
    # are the caption's features); the encoder and the two projections train.
    text_tower = forward - 2 * param_breakdown(m).output_head
    heads = 2 * (w + d) * v.clip_dim
    return VisionFlops(
        encoder_per_image=encoder,
        resampler_per_image=resampler,
        visual_kv_per_image=visual_kv,
        xattn_per_token=xattn,
        stage_per_token=lm + 3 * xattn + per_image / tokens_per_image,
        clip_stage_per_token=text_tower + 3 * (encoder + heads) / tokens_per_image,
    )
