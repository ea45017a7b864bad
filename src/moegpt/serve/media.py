"""Images in serving: decoding what a request sends, and its cross-attention cache.

A request's images are decoded once (Pillow) to the grey square the model was trained on. When
its sequence first runs, the runner encodes them (image encoder, then resampler) and keeps each
cross-attention block's keys and values for the request's life (:class:`VisualCache`), so no
step encodes an image again. Each step then cross-attends every sequence's new tokens to its
own images only: a token sees the latest image at or before it, and text before the first
image sees none, as the training forward's :func:`moegpt.model.vision.media_mask` says.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moegpt.errors import UserError
from moegpt.model.vision import VisionLanguageModel

# Larger images are refused before decoding (a small file can decode to gigabytes).
MAX_IMAGE_PIXELS = 4096 * 4096
# MIME types are case-insensitive; base64 may come wrapped in lines (RFC 2045's 76 columns).
_DATA_URL = re.compile(r"(?i:data:image/(png|jpeg|jpg);base64,)(.*)", re.DOTALL)
# Pillow's names for what a PNG or JPEG decodes as: MPO is a JPEG with extra pictures (a
# phone's preview or depth map) after its first.
FORMATS = ("PNG", "JPEG", "MPO")


def image_bytes(url: str, field: str) -> bytes:
    """The image a ``data:`` URL carries (base64 PNG or JPEG). Remote URLs are refused: the
    server fetches nothing."""
    if re.match(r"(?i)(https?|ftp)://", url):
        raise UserError(
            f"{field}: remote image URLs are not fetched (the server has no network); send the "
            "image inline as a data:image/png;base64,... URL"
        )
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise UserError(f"{field}: expected a data:image/png;base64,... or data:image/jpeg URL")
    try:
        return base64.b64decode(re.sub(r"\s+", "", match.group(2)), validate=True)
    except binascii.Error:
        raise UserError(f"{field}: the data URL's base64 is malformed") from None


def decode_image(data: bytes, size: int, field: str) -> torch.Tensor:
    """A PNG or JPEG as the model's input: grey, ``size`` x ``size``, uint8, as a viewer
    shows it (EXIF orientation applied, transparency over white, as the training images'
    background is)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise UserError(f"{field}: a {image.format} image; send PNG or JPEG")
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise UserError(
                    f"{field}: {image.width}x{image.height} pixels exceed the "
                    f"{MAX_IMAGE_PIXELS:,} an image may have"
                )
            upright = ImageOps.exif_transpose(image)
            if upright.has_transparency_data:
                rgba = upright.convert("RGBA")
                upright = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            grey = upright.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError:  # Pillow's own limit, above ours: same answer
        raise UserError(
            f"{field}: more than the {MAX_IMAGE_PIXELS:,} pixels an image may have"
        ) from None
    # SyntaxError: Pillow's word for a PNG whose chunks are broken
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{field}: not an image that decodes ({type(e).__name__})") from None
    return torch.from_numpy(np.asarray(grey, dtype=np.uint8).copy())


@dataclass
class VisualCache:
    """One sequence's images as the cross-attention blocks read them: each block's keys and
    values (1, heads, images x latents, head_dim) by the layer the block precedes, and where
    the sequence's ``<|image|>`` markers stand."""

    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]]
    markers: list[int]
    latents: int

    @classmethod
    @torch.inference_mode()
    def encode(
        cls, vision: VisionLanguageModel, images: torch.Tensor, markers: list[int]
    ) -> VisualCache:
        """Encode ``images`` (count, H, W) grey uint8 once, for every block."""
        device = vision.image_embedding.device
        visual = vision.encode_images(vision.pixels(images[None].to(device)))
        keys_values = {int(i): block.keys_values(visual) for i, block in vision.xattn.items()}
        return cls(keys_values, markers, vision.config.resampler_latents)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.keys_values.values() for t in kv)

    def latest(self, positions: range) -> list[int]:
        """For each position, the 1-based number of the latest image at or before it (0:
        none yet)."""
        return [bisect.bisect_right(self.markers, p) for p in positions]


def visual_bytes_per_image(vision: VisionLanguageModel) -> int:
    """What one image adds to a request's cache: keys and values for every block."""
    lm = vision.lm.config
    width = lm.n_heads * lm.head_dim
    element = vision.image_embedding.element_size()
    return len(vision.xattn) * 2 * vision.config.resampler_latents * width * element


def cross_attention(
    vision: VisionLanguageModel, slices: list[tuple[int, int, int, VisualCache | None]]
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The language model's ``before_layer`` for one packed step: ``slices`` give each
    sequence's (offset in the packed row, new tokens, first position, its images or None).
    Each block attends every sequence's tokens to that sequence's images alone, and passes
    every token through its feed-forward layer, as the training forward does."""
    attending = []
    for offset, new, start, cache in slices:
        if cache is None or not cache.markers:
            continue  # no image: the attention adds exactly nothing (its output is zeroed)
        latest = torch.tensor(cache.latest(range(start, start + new)))
        images = len(cache.markers)
        owner = torch.arange(images * cache.latents) // cache.latents + 1
        mask = (latest[:, None] == owner) & (latest[:, None] > 0)
        device = vision.image_embedding.device
        attending.append((offset, new, cache, mask[None, None].to(device), (latest > 0)[None]))

    def before_layer(layer: int, h: torch.Tensor) -> torch.Tensor:
        if str(layer) not in vision.xattn:
            return h
        block = vision.xattn[str(layer)]
        if attending:
            h = h.clone()
            for offset, new, cache, mask, has_media in attending:
                k, v = cache.keys_values[layer]
                part = h[:, offset : offset + new]
                h[:, offset : offset + new] = block.cross_attend(
                    part, k, v, mask, has_media.to(h.device)
                )
        return block.feed_forward(h)

    return before_layer
