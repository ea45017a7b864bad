"""Eyes for the language model, as Flamingo joins them (Alayrac et al. 2022; SPEC.md section 3):
a separate ViT image encoder, a Perceiver resampler that turns each image into a fixed number
of visual tokens, and gated cross-attention blocks inserted before every ``xattn_every``-th
layer of a pretrained language model, their tanh gates starting at 0 so that the model starts
out computing exactly what the language model did. Plain PyTorch: parallelism is applied from
outside, as for text.

An ``<|image|>`` token marks where each image stands in the text; every text token attends
only to the visual tokens of the latest image at or before it, and text before the first image
attends to none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moegpt.config import ModelConfig, VisionConfig
from moegpt.model.attention import masked_attention
from moegpt.model.feed_forward import FeedForward
from moegpt.model.transformer import ModelOutput, RMSNorm, Transformer


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, seq, heads x head_dim) -> (batch, heads, seq, head_dim). Heads are counted from
    the width: under tensor parallelism a rank's projections hold only its share of them."""
    batch, seq, width = x.shape
    return x.view(batch, seq, width // head_dim, head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads x head_dim)."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


class _MLP(nn.Module):
    """The encoder's and resampler's feed-forward: GELU over 4x the width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class _EncoderBlock(nn.Module):
    """A pre-norm ViT block: bidirectional self-attention over the patches, then the MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.head_dim = width // heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = _MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(t, self.head_dim) for t in self.qkv(self.norm(x)).chunk(3, dim=-1))
        x = x + self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))
        return x + self.mlp(x)


class ImageEncoder(nn.Module):
    """A ViT: non-overlapping patches embedded by one strided convolution, learned position
    embeddings, pre-norm blocks and a final norm. (images, C, H, W) -> (images, patches, width).
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.channels, config.width, config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Parameter(torch.zeros(config.patches, config.width))
        self.blocks = nn.ModuleList(
            _EncoderBlock(config.width, config.heads) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.shape[1:] != (self.config.channels, size, size):
            raise ValueError(
                f"images of shape {tuple(images.shape[1:])}; the encoder takes "
                f"({self.config.channels}, {size}, {size})"
            )
        x = self.patch_embedding(images).flatten(2).transpose(1, 2) + self.position_embedding
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _ResamplerBlock(nn.Module):
    """The latents attend to the media's features and to themselves (Flamingo's Perceiver
    resampler attends over their concatenation), then the MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.head_dim = width // heads
        self.media_norm = nn.LayerNorm(width)
        self.latent_norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = _MLP(width)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        queries = self.latent_norm(latents)
        context = torch.cat([self.media_norm(media), queries], dim=1)
        k, v = (_heads(t, self.head_dim) for t in self.kv(context).chunk(2, dim=-1))
        q = _heads(self.q(queries), self.head_dim)
        latents = latents + self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """Each media item's features (items, frames, patches, width), plus a learned embedding of
    each frame's time, become ``resampler_latents`` visual tokens: (items, latents, width)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.resampler_latents, config.width) * 0.02)
        self.time_embedding = nn.Parameter(torch.zeros(config.max_frames, 1, config.width))
        self.blocks = nn.ModuleList(
            _ResamplerBlock(config.width, config.heads) for _ in range(config.resampler_depth)
        )
        self.norm = nn.LayerNorm(config.width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        items, frames = features.shape[:2]
        if frames > self.time_embedding.shape[0]:
            raise ValueError(
                f"{frames} frames a media item; the model has time embeddings for "
                f"{self.time_embedding.shape[0]}"
            )
        media = (features + self.time_embedding[:frames]).flatten(1, 2)
        latents = self.latents.expand(items, -1, -1)
        for block in self.blocks:
            latents = block(media, latents)
        return self.norm(latents)


def media_mask(
    tokens: torch.Tensor,
    image_token_id: int,
    images_per_sequence: int,
    tokens_per_image: int,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which visual tokens each text token may attend to: those of the latest image at or
    before it (its ``<|image|>`` token counts) within its own document, when ``document_ids``
    (batch, seq) pack several into a row. Images are numbered in row order. Returns the mask
    (batch, 1, seq, images x tokens_per_image) and whether each token has an image at all
    (batch, seq)."""
    is_image = tokens == image_token_id
    latest = is_image.cumsum(dim=1)  # 1-based index of the row's latest image so far
    most = int(latest[:, -1].max())  # one host sync: a marker without its image is an error
    if most > images_per_sequence:
        raise ValueError(
            f"a sequence has {most} <|image|> tokens but only {images_per_sequence} images "
            "were given for it"
        )
    has_media = latest > 0
    if document_ids is not None:  # images before a token's document started are not its own
        starts = torch.ones_like(is_image)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        before = latest - is_image.long()
        before_document = torch.where(starts, before, 0).cummax(dim=1).values
        has_media = latest > before_document
    owner = torch.arange(images_per_sequence * tokens_per_image, device=tokens.device)
    owner = owner // tokens_per_image + 1
    mask = (latest.unsqueeze(-1) == owner) & has_media.unsqueeze(-1)
    return mask.unsqueeze(1), has_media


def caption_owners(
    tokens: torch.Tensor,
    image_token_id: int,
    images_per_sequence: int,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch, seq, images) True where a token belongs to an image's caption: the text after
    its ``<|image|>`` marker, up to the next marker or the end of its document."""
    mask, _ = media_mask(tokens, image_token_id, images_per_sequence, 1, document_ids)
    return mask[:, 0] & (tokens != image_token_id).unsqueeze(-1)


def caption_count(
    tokens: torch.Tensor, image_token_id: int, document_ids: torch.Tensor | None = None
) -> int:
    """Images of a batch with a caption (the contrastive loss's units): markers followed by
    text of their own document."""
    slots = int((tokens == image_token_id).sum(dim=1).max()) if tokens.numel() else 0
    if slots == 0:
        return 0
    return int(caption_owners(tokens, image_token_id, slots, document_ids).any(dim=1).sum())


# An odd 64-bit multiplier (2^64 / golden ratio): captions hash as polynomials in it, mod 2^64.
_HASH = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64


def _caption_signatures(tokens: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """(batch, images) int64 hashes of each caption's tokens in order, as polynomials mod
    2^64: equal captions hash equal, and different ones of caption length practically never
    collide."""
    offsets = (owners.long().cumsum(dim=1) - 1).clamp(min=0)  # place within the caption
    powers = torch.full((tokens.shape[1],), _HASH, dtype=torch.long, device=tokens.device)
    powers = powers.cumprod(0)  # wraps mod 2^64
    terms = (tokens.unsqueeze(-1) + 1) * powers[offsets]
    return torch.where(owners, terms, 0).sum(dim=1)


class ContrastiveHeads(nn.Module):
    """CLIP's heads (Radford et al. 2021) for stage (a): linear projections of an image's
    pooled encoder features and of its caption's features into one space, and a learned
    temperature, kept as the log of the logit scale (from 1/0.07, capped at 100)."""

    def __init__(self, image_width: int, text_width: int, dim: int) -> None:
        super().__init__()
        self.image_projection = nn.Linear(image_width, dim, bias=False)
        self.text_projection = nn.Linear(text_width, dim, bias=False)
        # One element, not a scalar: FSDP2 shards no 0-D parameter.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def forward(
        self,
        images: torch.Tensor,
        captions: torch.Tensor,
        signatures: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """The symmetric contrastive loss of ``images`` (n, image width) against their
        ``captions`` (n, text width), summed over the ``valid`` pairs, with every other valid
        pair of the batch as negatives. Pairs whose captions are the same text (equal
        ``signatures``) are all positives, each row's target spread evenly over them, so two
        images of "a coat above a shirt" are not pushed apart. Shapes stay fixed (invalid
        rows and columns are masked), so no host sync."""
        x = F.normalize(self.image_projection(images).float(), dim=-1)
        y = F.normalize(self.text_projection(captions).float(), dim=-1)
        scale = self.logit_scale.float().clamp(max=math.log(100.0)).exp()
        pairs = valid.unsqueeze(0) & valid.unsqueeze(1)
        # In fp32 under autocast too: bf16 cannot hold the mask's fill (float32's lowest), and
        # the scores' softmax wants the precision.
        with torch.autocast(x.device.type, enabled=False):
            scores = scale * x @ y.T
        logits = scores.masked_fill(~pairs, torch.finfo(torch.float32).min)
        same = (signatures.unsqueeze(0) == signatures.unsqueeze(1)) & pairs
        targets = same.float() / same.sum(dim=1, keepdim=True).clamp(min=1)  # symmetric
        image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
        text_to_image = -(targets * F.log_softmax(logits, dim=0)).sum(dim=0)
        return torch.where(valid, image_to_text + text_to_image, 0).sum() / 2


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE: the text attends to the visual tokens, then a
    feed-forward layer, each added to the residual stream through tanh(gate). The gates start
    at 0, so an inserted block changes nothing until training opens it."""

    def __init__(self, config: ModelConfig, vision_width: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.q = nn.Linear(config.d_model, config.d_model, bias=False)
        # Separate key and value projections, so tensor parallelism can split each by heads.
        self.k = nn.Linear(vision_width, config.d_model, bias=False)
        self.v = nn.Linear(vision_width, config.d_model, bias=False)
        self.wo = nn.Linear(config.d_model, config.d_model, bias=False)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = FeedForward(config, config.ffn_hidden)
        self.attention_gate = nn.Parameter(torch.zeros(1))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor, has_media: torch.Tensor
    ) -> torch.Tensor:
        """``x`` (batch, seq, d_model), ``visual`` (batch, visual tokens, vision width) and
        :func:`media_mask`'s mask and per-token flags."""
        k, v = self.keys_values(visual)
        return self.feed_forward(self.cross_attend(x, k, v, mask, has_media))

    def keys_values(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The visual tokens' keys and values (batch, heads, visual tokens, head_dim): what
        a server computes once per request and keeps."""
        return _heads(self.k(visual), self.head_dim), _heads(self.v(visual), self.head_dim)

    def cross_attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        has_media: torch.Tensor,
    ) -> torch.Tensor:
        """The residual stream after the gated cross-attention."""
        q = _heads(self.q(self.attention_norm(x)), self.head_dim)
        # A token with no image yet would have an all-False row (a NaN softmax): let it see
        # every visual token, then zero what it got.
        attended = masked_attention(q, k, v, mask | ~has_media[:, None, :, None])
        attended = self.wo(_merge(attended)) * has_media.unsqueeze(-1).to(x.dtype)
        return x + torch.tanh(self.attention_gate) * attended

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after the gated feed-forward layer (every token passes it)."""
        return x + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(x))


class VisionLanguageModel(nn.Module):
    """A language model with eyes: ``lm`` (any :class:`Transformer`, usually pretrained and
    frozen), the image encoder, the resampler, a gated cross-attention block before every
    ``xattn_every``-th layer, and a learned ``<|image|>`` embedding (so the marker can be
    trained while the language model's embeddings stay frozen)."""

    def __init__(self, lm: Transformer, config: VisionConfig, image_token_id: int) -> None:
        super().__init__()
        self.lm = lm
        self.config = config
        self.image_token_id = image_token_id
        self.encoder = ImageEncoder(config)
        self.resampler = PerceiverResampler(config)
        self.xattn = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(lm.config, config.width)
                for i in range(0, lm.config.n_layers, config.xattn_every)
            }
        )
        self.image_embedding = nn.Parameter(torch.zeros(lm.config.d_model))
        if config.objective == "clip":
            self.clip = ContrastiveHeads(config.width, lm.config.d_model, config.clip_dim)
        self.reset_vision_parameters()

    def init_parameter(
        self, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Fill ``tensor`` (the whole of parameter ``name``) as this model initialises it:
        the language model's by its own rules; normal weights scaled by fan-in (a
        convolution's is channels x patch area), zero biases and gates, unit norms, and the
        ``<|image|>`` embedding drawn as a row of the token embeddings is (a model built
        around an existing language model copies that row instead: see
        :meth:`reset_vision_parameters`; a training run gets it from its parent)."""
        if name.startswith("lm."):
            self.lm.init_parameter(name.removeprefix("lm."), tensor, generator)
        elif name.endswith(("_gate", "bias")):
            nn.init.zeros_(tensor)
        elif name.endswith("norm.weight"):
            nn.init.ones_(tensor)
        elif name == "image_embedding":
            nn.init.normal_(tensor, std=self.lm.config.init_std, generator=generator)
        elif name == "clip.logit_scale":
            nn.init.constant_(tensor, math.log(1 / 0.07))
        elif name == "encoder.position_embedding":
            nn.init.normal_(tensor, std=0.02, generator=generator)
        elif tensor.ndim >= 2:
            nn.init.normal_(tensor, std=1 / math.sqrt(tensor[0].numel()), generator=generator)
        else:
            raise ValueError(f"{name}: no initialisation rule for a {tensor.ndim}-D parameter")

    @torch.no_grad()
    def reset_vision_parameters(self) -> None:
        """Initialise what vision adds (:meth:`init_parameter`); the language model keeps its
        weights, and the ``<|image|>`` embedding starts as its row for the token."""
        for name, param in self.named_parameters():
            if not name.startswith("lm."):
                self.init_parameter(name, param)
        if self.lm.tok_embeddings is not None:
            self.image_embedding.copy_(self.lm.tok_embeddings.weight[self.image_token_id])

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Grey uint8 images (batch, images, H, W), as prepared data stores them, as the
        encoder's input: values in [0, 1], the grey channel repeated to ``channels``, in the
        model's dtype. Float images (batch, images, C, H, W) pass through."""
        if images.dtype != torch.uint8:
            return images
        dtype = self.image_embedding.dtype
        grey = images.to(dtype).div_(255.0).unsqueeze(2)
        return grey.expand(-1, -1, self.config.channels, -1, -1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens of each sequence's images: (batch, images, C, H, W) ->
        (batch, images x resampler_latents, width)."""
        batch, count = images.shape[:2]
        features = self.encoder(images.flatten(0, 1)).unsqueeze(1)  # one frame per image
        visual = self.resampler(features)
        return visual.view(batch, count * visual.shape[1], visual.shape[2])

    def mark_images(self, tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Embeddings ``h`` of ``tokens`` with each ``<|image|>`` token's replaced by the
        learned image embedding."""
        is_image = (tokens == self.image_token_id).unsqueeze(-1)
        return torch.where(is_image, self.image_embedding.to(h.dtype), h)

    def forward(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for ``tokens`` (batch, seq) whose ``<|image|>`` tokens stand for ``images``
        (batch, images, C, H, W), or grey uint8 (batch, images, H, W), in order; a sequence
        with fewer images than others leaves the rest of its slots as padding, which no token
        attends to.

        Every part runs whatever the batch holds, as in Flamingo: text with no image before it
        gets no cross-attention but does pass the blocks' feed-forward layers, so a text
        sequence computes the same with or without images beside it. A batch without images
        (None, or none) encodes one blank image that no token sees: its ranks then run the
        same collectives as those with images (FSDP gathers each vision part).

        With ``vision.objective = "clip"`` the output's ``loss_sum`` is the contrastive loss
        (:meth:`contrastive`) and its logits are the language model's final states."""
        if self.config.objective == "clip":
            return self.contrastive(tokens, images, positions, document_ids)
        if images is None or images.shape[1] == 0:
            if (tokens == self.image_token_id).any():
                raise ValueError("tokens hold <|image|> markers but no images were given")
            size = self.config.image_size
            blank = torch.zeros(1, 1, size, size, dtype=torch.uint8, device=tokens.device)
            visual = self.encode_images(self.pixels(blank)).expand(tokens.shape[0], -1, -1)
            count = 1
        else:
            visual = self.encode_images(self.pixels(images))
            count = images.shape[1]
        mask, has_media = media_mask(
            tokens, self.image_token_id, count, self.config.resampler_latents, document_ids
        )

        def cross_attend(layer: int, h: torch.Tensor) -> torch.Tensor:
            if str(layer) not in self.xattn:
                return h
            return self.xattn[str(layer)](h, visual, mask, has_media)

        return self.lm(
            tokens,
            positions,
            document_ids=document_ids,
            edit_embeddings=lambda h: self.mark_images(tokens, h),
            before_layer=cross_attend,
            padding=padding,
        )

    def contrastive(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Stage (a), CLIP's objective: each image's encoder features, averaged over its
        patches, against its caption's features, the frozen language model's final states
        averaged over the caption's tokens (the text after the image's marker in its
        document), both through :class:`ContrastiveHeads`; the batch's other images are the
        negatives. A batch without images encodes blank ones that no caption matches (every
        rank runs the same collectives)."""
        if images is None or images.shape[1] == 0:
            if (tokens == self.image_token_id).any():
                raise ValueError("tokens hold <|image|> markers but no images were given")
            size = self.config.image_size
            images = tokens.new_zeros((tokens.shape[0], 1, size, size), dtype=torch.uint8)
        count = images.shape[1]
        pooled = self.encoder(self.pixels(images).flatten(0, 1)).mean(dim=1)
        with torch.no_grad():  # the text tower is the frozen language model
            out = self.lm(
                tokens,
                positions,
                document_ids=document_ids,
                edit_embeddings=lambda h: self.mark_images(tokens, h),
                head=False,
            )
        states = out.logits
        owners = caption_owners(tokens, self.image_token_id, count, document_ids)
        weights = owners.to(states.dtype)
        lengths = owners.sum(dim=1)  # (batch, images)
        captions = torch.einsum("bsi,bsd->bid", weights, states)
        captions = captions / lengths.clamp(min=1).unsqueeze(-1).to(states.dtype)
        signatures = _caption_signatures(tokens, owners)
        loss = self.clip(
            pooled,
            captions.flatten(0, 1),
            signatures.flatten(),
            (lengths > 0).flatten(),
        )
        return ModelOutput(
            logits=states, aux_loss=out.aux_loss, moe_stats=out.moe_stats, loss_sum=loss
        )


def model_for(model: ModelConfig, vision: VisionConfig) -> Transformer | VisionLanguageModel:
    """The network a recipe describes: its language model, with eyes when vision is on."""
    lm = Transformer(model)
    return VisionLanguageModel(lm, vision, vision.image_token_id) if vision.enabled else lm


def language_model(network: nn.Module) -> Transformer:
    """The language model inside ``network`` (itself, for a text model)."""
    return network.lm if isinstance(network, VisionLanguageModel) else network
