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


# Every attending sequence of a step cross-attends in one masked attention per block, against
# all their visual tokens at once (one call, not one per sequence: 64 decoding requests with an
# image each were 8x slower than text when each ran its own). The mask holds one entry per (new
# token, visual token), so a long prefill beside many images is split into groups of at most
# this many entries.
MASK_ENTRIES = 1 << 24


@dataclass
class _Group:
    """Consecutive sequences of a packed step that cross-attend together: their rows, their
    caches (keys side by side in this order), and which visual tokens each row may see."""

    rows: slice
    caches: list[VisualCache]
    mask: torch.Tensor  # (1, 1, rows, visual tokens)
    has_media: torch.Tensor  # (1, rows)

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.caches) == 1:
            return self.caches[0].keys_values[layer]
        k, v = zip(*(cache.keys_values[layer] for cache in self.caches), strict=True)
        return torch.cat(k, dim=2), torch.cat(v, dim=2)


def _group(members: list[tuple[int, int, int, VisualCache]], device: torch.device) -> _Group:
    first, last = members[0][0], members[-1][0] + members[-1][1]
    widths = [len(cache.markers) * cache.latents for *_, cache in members]
    mask = torch.zeros(last - first, sum(widths), dtype=torch.bool)
    has_media = torch.zeros(last - first, dtype=torch.bool)
    column = 0
    for (offset, new, start, cache), width in zip(members, widths, strict=True):
        latest = torch.tensor(cache.latest(range(start, start + new)))
        owner = torch.arange(width) // cache.latents + 1
        rows = slice(offset - first, offset - first + new)
        mask[rows, column : column + width] = (latest[:, None] == owner) & (latest[:, None] > 0)
        has_media[rows] = latest > 0
        column += width
    return _Group(
        slice(first, last),
        [cache for *_, cache in members],
        mask[None, None].to(device),
        has_media[None].to(device),
    )


def _groups(
    slices: list[tuple[int, int, int, VisualCache | None]], device: torch.device
) -> list[_Group]:
    """The step's sequences that have images, in packed order, in groups whose masks stay
    within :data:`MASK_ENTRIES` (a sequence larger than that alone is a group of its own)."""
    attending = sorted(
        (
            (offset, new, start, cache)
            for offset, new, start, cache in slices
            if cache and cache.markers
        ),
        key=lambda member: member[0],
    )
    groups: list[list[tuple[int, int, int, VisualCache]]] = []
    keys = 0  # the last group's visual tokens
    for member in attending:
        offset, new, _, cache = member
        width = len(cache.markers) * cache.latents
        if groups and (offset + new - groups[-1][0][0]) * (keys + width) <= MASK_ENTRIES:
            groups[-1].append(member)
            keys += width
        else:
            groups.append([member])
            keys = width
    return [_group(members, device) for members in groups]


def cross_attention(
    vision: VisionLanguageModel, slices: list[tuple[int, int, int, VisualCache | None]]
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The language model's ``before_layer`` for one packed step: ``slices`` give each
    sequence's (offset in the packed row, new tokens, first position, its images or None).
    Each block attends every sequence's tokens to that sequence's images alone, and passes
    every token through its feed-forward layer, as the training forward does. A token with no
    image to see (text before a sequence's first image, or a sequence without images) gets
    exactly nothing from the attention (its output is zeroed)."""
    groups = _groups(slices, vision.image_embedding.device)

    def before_layer(layer: int, h: torch.Tensor) -> torch.Tensor:
        if str(layer) not in vision.xattn:
            return h
        block = vision.xattn[str(layer)]
        if groups:
            h = h.clone()
            for group in groups:
                k, v = group.keys_values(layer)
                h[:, group.rows] = block.cross_attend(
                    h[:, group.rows], k, v, group.mask, group.has_media
                )
        return block.feed_forward(h)

    return before_layer
