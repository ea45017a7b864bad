"""Recipe configuration: frozen dataclasses, TOML files, dotted command-line overrides.

A recipe is one TOML file with the sections ``[model]``, ``[data]``, ``[train]``, ``[parallel]``
and ``[serve]``; every key is a field declared below with its documentation. Every value is
checked when the config is built (type, range, and the rules that tie fields together), and a
bad one raises :class:`ConfigError` with a single line naming the dotted field and the reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from moegpt.errors import ConfigError


def _doc(default: Any, help: str) -> Any:
    """A dataclass field with its documentation attached (shown by `moegpt config show`)."""
    return field(default=default, metadata={"help": help})


class _Section:
    """Behaviour shared by the config sections: type checks and one-line errors."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _check_type(self._name(f.name), getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Rules between fields of this section; overridden by sections that have them."""

    def _name(self, field_name: str) -> str:
        return f"{self.SECTION}.{field_name}"

    def _fail(self, field_name: str, reason: str) -> typing.NoReturn:
        raise ConfigError(f"{self._name(field_name)}: {reason}")

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value <= 0:
                self._fail(name, f"must be positive, got {value}")

    def _non_negative(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value < 0:
                self._fail(name, f"must be >= 0, got {value}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of strings" if typing.get_args(tp)[0] is str else "a list of tables"
    if isinstance(tp, type) and issubclass(tp, _Section):
        return "a table"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[tp]


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Return ``value`` (ints widened to float where a float is declared) or raise."""
    if typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{name}: must be a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is str:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif typing.get_origin(tp) is tuple:  # tuple[Section, ...]: a TOML array of tables
        if isinstance(value, list | tuple):
            item_cls = typing.get_args(tp)[0]
            return tuple(_section_item(name, i, item_cls, item) for i, item in enumerate(value))
    elif isinstance(tp, type) and issubclass(tp, _Section):  # a sub-table, e.g. [model.x]
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return section_from_dict(tp, value)
    else:  # pragma: no cover - a field declared with an unsupported type is a programming error
        raise TypeError(f"{name}: unsupported config field type {tp!r}")
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _section_item(name: str, index: int, cls: type[_Section], item: Any) -> Any:
    """One table of an array of tables, its errors named ``name[index].field``."""
    if isinstance(item, cls):
        return item
    if not isinstance(item, Mapping):
        raise ConfigError(f"{name}[{index}]: expected a table, got {item!r}")
    try:
        return section_from_dict(cls, item)
    except ConfigError as e:
        raise ConfigError(str(e).replace(f"{cls.SECTION}.", f"{name}[{index}].", 1)) from None


ROPE_TYPES = ("none", "linear", "ntk", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling(_Section):
    """How rotary positions stretch past the context a model was trained at: Hugging Face's
    ``rope_scaling`` keys (see :mod:`moegpt.model.rope`)."""

    SECTION: ClassVar[str] = "model.rope_scaling"

    type: Literal["none", "linear", "ntk", "yarn", "llama3"] = _doc(
        "none",
        "none; linear (position interpolation); ntk (NTK-aware: a larger base); yarn "
        "(NTK-by-parts plus an attention temperature); llama3 (Llama 3.1's by-parts rule)",
    )
    factor: float = _doc(1.0, "context extension factor s (>= 1; 1 leaves every type unscaled)")
    original_max_seq_len: int = _doc(
        0, "context the model was pretrained at (yarn, llama3: required; <= model.max_seq_len)"
    )
    beta_fast: float = _doc(32.0, "yarn: rotations above which a channel pair is not scaled")
    beta_slow: float = _doc(1.0, "yarn: rotations below which a channel pair is fully scaled")
    attention_factor: float = _doc(
        0.0, "yarn: q and k scale (the temperature's square root); 0 = 0.1 ln(factor) + 1"
    )
    low_freq_factor: float = _doc(1.0, "llama3: wavelengths above original / this are scaled")
    high_freq_factor: float = _doc(4.0, "llama3: wavelengths below original / this are kept")

    def validate(self) -> None:
        if self.factor < 1:
            self._fail("factor", f"must be at least 1, got {self.factor}")
        self._positive("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor")
        self._non_negative("original_max_seq_len", "attention_factor")
        if self.type in ("yarn", "llama3") and self.original_max_seq_len == 0:
            self._fail(
                "original_max_seq_len",
                f"type {self.type!r} needs the context the model was pretrained at (> 0)",
            )
        if self.beta_fast <= self.beta_slow:
            self._fail("beta_fast", f"{self.beta_fast} must exceed beta_slow ({self.beta_slow})")
        if self.high_freq_factor <= self.low_freq_factor:
            high, low = self.high_freq_factor, self.low_freq_factor
            self._fail("high_freq_factor", f"{high} must exceed low_freq_factor ({low})")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The transformer: sizes, attention, Mixture-of-Experts and positions.

    The defaults of every section are the tiny recipe (configs/tiny.toml), so `moegpt
    quickstart` and any verb run without --config work on a fresh machine."""

    SECTION: ClassVar[str] = "model"

    vocab_size: int = _doc(4096, "number of token ids (the tokenizer's vocabulary size)")
    d_model: int = _doc(192, "width of the residual stream")
    n_layers: int = _doc(4, "number of transformer blocks")
    n_heads: int = _doc(6, "query heads; head_dim = d_model / n_heads")
    n_kv_heads: int = _doc(1, "key/value heads: 1 = multi-query attention (GPT-4), n_heads = MHA")
    ffn_hidden: int = _doc(512, "hidden size of the dense feed-forward layers")
    activation: Literal["swiglu", "gelu"] = _doc(
        "swiglu", "feed-forward activation: swiglu (3 matrices) or gelu (2 matrices)"
    )
    n_experts: int = _doc(8, "experts per MoE layer; 0 makes every layer dense")
    top_k: int = _doc(2, "experts each token is routed to")
    expert_hidden: int = _doc(0, "hidden size of each expert; 0 = ffn_hidden")
    first_k_dense: int = _doc(0, "the first k layers use a dense feed-forward instead of MoE")
    router_renormalize: bool = _doc(
        True, "scale the top-k weights to sum to 1 (Mixtral); turn off for top-1 (Switch)"
    )
    capacity_factor: float = _doc(
        0.0, "training-time expert capacity as a multiple of the balanced load; 0 = dropless"
    )
    aux_loss_coef: float = _doc(0.01, "weight of the switch load-balancing loss (1.0 at balance)")
    z_loss_coef: float = _doc(0.001, "weight of the router z-loss (mean squared logsumexp)")
    max_seq_len: int = _doc(512, "longest sequence the model is built for (context length)")
    rope_theta: float = _doc(10000.0, "rotary embedding base")
    rope_scaling: RopeScaling = field(
        default_factory=RopeScaling,
        metadata={"help": "rotary scaling for long context (a table, [model.rope_scaling])"},
    )
    norm_eps: float = _doc(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = _doc(False, "share the token embedding with the output head")
    init_std: float = _doc(0.02, "standard deviation of the initial weights")

    def __post_init__(self) -> None:
        if self.rope_scaling == "none":  # how configs before rope scaling spelled it
            object.__setattr__(self, "rope_scaling", RopeScaling())
        super().__post_init__()

    def validate(self) -> None:
        self._positive("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads")
        self._positive("ffn_hidden", "max_seq_len", "rope_theta", "norm_eps", "init_std")
        self._non_negative("n_experts", "expert_hidden", "first_k_dense", "capacity_factor")
        self._non_negative("aux_loss_coef", "z_loss_coef")
        if self.d_model % self.n_heads:
            self._fail(
                "d_model", f"{self.d_model} is not divisible by model.n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            kv = self.n_kv_heads
            self._fail("n_heads", f"{self.n_heads} is not divisible by model.n_kv_heads ({kv})")
        if self.head_dim % 2:
            self._fail("d_model", f"head_dim (d_model / n_heads = {self.head_dim}) must be even")
        if self.n_experts:
            if self.top_k < 1:
                self._fail("top_k", f"must be at least 1 with experts, got {self.top_k}")
            if self.top_k > self.n_experts:
                self._fail("top_k", f"{self.top_k} exceeds model.n_experts ({self.n_experts})")
        if self.first_k_dense > self.n_layers:
            k, n = self.first_k_dense, self.n_layers
            self._fail("first_k_dense", f"{k} exceeds model.n_layers ({n})")
        original = self.rope_scaling.original_max_seq_len
        if original > self.max_seq_len:
            raise ConfigError(
                f"model.rope_scaling.original_max_seq_len: {original} exceeds "
                f"model.max_seq_len ({self.max_seq_len})"
            )
        kind = self.rope_scaling.type
        if kind == "ntk" and self.head_dim <= 2:  # its base grows by factor^(d / (d - 2))
            self._fail("rope_scaling", f"ntk needs a head_dim above 2, got {self.head_dim}")
        if kind == "yarn" and self.rope_theta <= 1:  # its ramp divides by ln(theta)
            self._fail("rope_theta", f"yarn needs a base above 1, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_hidden_size(self) -> int:
        return self.expert_hidden or self.ffn_hidden

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.first_k_dense

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def kv_cache_bytes_per_token(
        self, bytes_per_element: int = 2, n_kv_heads: int | None = None
    ) -> int:
        """Bytes of K and V cached per token over all layers (bf16 by default).

        ``n_kv_heads`` overrides the model's value, e.g. ``n_heads`` for the MHA equivalent.
        """
        heads = self.n_kv_heads if n_kv_heads is None else n_kv_heads
        return 2 * self.n_layers * heads * self.head_dim * bytes_per_element


@dataclass(frozen=True)
class VisionConfig(_Section):
    """Eyes for the language model, Flamingo-style (SPEC.md section 3): a ViT image encoder, a
    Perceiver resampler that turns each image into a fixed number of visual tokens, and gated
    cross-attention blocks before every ``xattn_every``-th LM layer. Off unless enabled."""

    SECTION: ClassVar[str] = "vision"

    enabled: bool = _doc(False, "give the model an image encoder and cross-attention")
    image_size: int = _doc(32, "images are resized to image_size x image_size pixels")
    channels: int = _doc(3, "colour channels of the encoder's input (1 = grey)")
    patch_size: int = _doc(4, "the encoder cuts an image into patch_size x patch_size patches")
    width: int = _doc(128, "width of the encoder and the resampler")
    depth: int = _doc(2, "encoder blocks")
    heads: int = _doc(4, "attention heads of the encoder and the resampler")
    resampler_latents: int = _doc(8, "visual tokens per image (the resampler's learned latents)")
    resampler_depth: int = _doc(1, "resampler blocks")
    max_frames: int = _doc(1, "frames per media item (media-time embeddings; 1 for images)")
    xattn_every: int = _doc(2, "a gated cross-attention block before every n-th LM layer")
    image_token_id: int = _doc(4, "the <|image|> token's id (moegpt's tokenizers reserve 4)")
    objective: Literal["flamingo", "clip"] = _doc(
        "flamingo",
        "what a run trains: flamingo (next-token loss on text that reads the images through "
        "the cross-attention) or clip (stage (a): the image encoder alone, contrastively "
        "against the frozen language model's mean caption state through two projection "
        "heads; everything else stays frozen)",
    )
    clip_dim: int = _doc(128, "width of the joint space the clip objective's heads project to")

    def validate(self) -> None:
        self._positive("image_size", "channels", "patch_size", "width", "depth", "heads")
        self._positive("clip_dim")
        self._positive("resampler_latents", "resampler_depth", "max_frames", "xattn_every")
        self._non_negative("image_token_id")
        if self.image_size % self.patch_size:
            self._fail(
                "image_size",
                f"{self.image_size} is not divisible by vision.patch_size ({self.patch_size})",
            )
        if self.width % self.heads:
            self._fail("width", f"{self.width} is not divisible by vision.heads ({self.heads})")

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def clip_stage(self) -> bool:
        """Whether a run with this section trains the CLIP stage (a)."""
        return self.enabled and self.objective == "clip"


RENDERED_CORPUS = "stdlib:rendered"  # lines of the stdlib's code, to transcribe
WORD_LINES_CORPUS = "stdlib:rendered-words"  # its files' words in a random order
FASHION_CORPUS = "debian:fashion-mnist"
IMAGE_CORPORA = (RENDERED_CORPUS, WORD_LINES_CORPUS, FASHION_CORPUS)
# Corpora with a held-out split of their own: their val_fraction sizes it and splits nothing else
OWN_SPLIT_CORPORA = (FASHION_CORPUS,)
CONVERSATION_CORPUS = "stdlib:instruct"  # the built-in corpus of kind = "chat"
PACKAGES_CORPUS = "stdlib:packages"  # stdlib:code's files, grouped by package
BUILTIN_CORPORA = (
    "stdlib:code",
    PACKAGES_CORPUS,
    "stdlib:text",
    CONVERSATION_CORPUS,
    "debian:wordnet",
    "debian:python-doc",
    "debian:gcide",
)


@dataclass(frozen=True)
class SourceConfig(_Section):
    """One data source of the mixture (a ``[[data.sources]]`` table)."""

    SECTION: ClassVar[str] = "data.sources"

    name: str = _doc("", "unique name: used in reports, shard folders and eval metrics")
    kind: Literal["text", "code", "chat", "image_text"] = _doc(
        "text", "what the documents are (image_text: an image and its caption each)"
    )
    path: str = _doc(
        "",
        "files, a glob, a folder, or a built-in corpus: " + ", ".join(BUILTIN_CORPORA),
    )
    format: Literal["auto", "text", "jsonl"] = _doc(
        "auto", "auto: *.jsonl files are JSON lines, other files one document each"
    )
    text_field: str = _doc("text", "the JSONL field that holds a document's text")
    epochs: int = _doc(1, "times each training token of this source is seen over a full run")
    weight: float = _doc(
        0.0, "interleaving weight; 0 = proportional to epochs x tokens (sources end together)"
    )
    val_fraction: float = _doc(0.01, "share of the documents held out for validation")
    items: int = _doc(
        0,
        "image_text: how many images to make (0 = every rendered line, 10,000 canvases; "
        f"{WORD_LINES_CORPUS} needs a count)",
    )
    interleave: int = _doc(
        1,
        "image_text: items per episode: that many consecutive images with their captions share "
        "one document (image, caption, image, caption, ...), Flamingo's interleaved few-shot "
        "sequences; 1 = each item alone",
    )
    augment: bool = _doc(
        False,
        f"{FASHION_CORPUS}: each training canvas's items mirrored left-right at random and "
        "shifted by up to 2 pixels (held-out canvases stay as the dataset has them)",
    )

    def validate(self) -> None:
        self._non_negative("items")
        self._positive("interleave")
        if self.interleave > 1 and self.kind != "image_text":
            self._fail("interleave", f"interleaves image_text items; this source is {self.kind}")
        if self.kind == "image_text" and self.path not in IMAGE_CORPORA:
            self._fail(
                "path", f"image_text sources are {', '.join(IMAGE_CORPORA)}, not {self.path!r}"
            )
        if self.path in IMAGE_CORPORA and self.kind != "image_text":
            self._fail("kind", f'{self.path} holds images with captions: kind = "image_text"')
        if self.augment and self.path != FASHION_CORPUS:
            self._fail(
                "augment", f"only {FASHION_CORPUS}'s canvases are augmented, not {self.path}'s"
            )
        if self.path == WORD_LINES_CORPUS and not self.items:
            self._fail("items", f"{WORD_LINES_CORPUS} makes as many lines as asked: give a count")
        if not self.name or not all(ch.isalnum() or ch in "-_" for ch in self.name):
            self._fail("name", f"must be non-empty letters, digits, - or _, got {self.name!r}")
        if not self.path:
            self._fail("path", "must name files, a folder or a built-in corpus")
        conversations = self.path == CONVERSATION_CORPUS
        if self.path in BUILTIN_CORPORA and conversations != (self.kind == "chat"):
            self._fail(
                "kind",
                f'{self.path} holds conversations: use kind = "chat"'
                if conversations
                else f'"chat" reads conversations, and {self.path} holds none (the built-in '
                f"conversations are {CONVERSATION_CORPUS})",
            )
        self._positive("epochs")
        self._non_negative("weight")
        if not 0.0 <= self.val_fraction < 1.0:
            self._fail("val_fraction", f"must be in [0, 1), got {self.val_fraction}")


DEFAULT_SOURCES = (
    SourceConfig(name="code", kind="code", path="stdlib:code", epochs=4, val_fraction=0.05),
    SourceConfig(name="text", kind="text", path="stdlib:text", epochs=2, val_fraction=0.05),
)


@dataclass(frozen=True)
class DataConfig(_Section):
    """Where the training tokens come from and how they are mixed."""

    SECTION: ClassVar[str] = "data"

    seq_len: int = _doc(256, "tokens per training sequence (<= model.max_seq_len)")
    tokenizer: str = _doc("", "path to a tokenizer.json; empty = the one `moegpt prepare` trains")
    data_dir: str = _doc("data/tiny", "folder of prepared token shards")
    seed: int = _doc(1234, "seed of the document order (independent of the model's)")
    document_mask: bool = _doc(False, "attention does not cross document boundaries")
    long_doc_tokens: int = _doc(
        0,
        "documents longer than this are repeated long_doc_repeat times in each epoch of their "
        "source (context-extension data: the original context); 0 = off",
    )
    long_doc_repeat: int = _doc(1, "copies of each long document per epoch (see long_doc_tokens)")
    packing: Literal["stream", "documents"] = _doc(
        "stream",
        "stream: documents back to back, cut into windows (pre-training); documents: whole "
        "documents per sequence, padded (fine-tuning: conversations need it)",
    )
    long_documents: Literal["truncate", "skip"] = _doc(
        "truncate", "packing = documents: a document longer than seq_len is cut to it or left out"
    )
    workers: int = _doc(
        0, "worker processes of `moegpt prepare` (tokenizing, drawing lines); 0 = one per core"
    )
    sources: tuple[SourceConfig, ...] = _doc(
        DEFAULT_SOURCES, "the mixture: [[data.sources]] tables (default: stdlib code x4, text x2)"
    )

    @property
    def worker_processes(self) -> int:
        """``workers``, with 0 as one per core."""
        return self.workers or os.cpu_count() or 1

    @property
    def exclude_below(self) -> float:
        """Documents whose held-out score is below this are never trained on: the largest
        validation fraction of the sources split by key, so that documents shared between
        sources are held out of all of them (see ``prepare.split_documents``)."""
        by_key = [s.val_fraction for s in self.sources if s.path not in OWN_SPLIT_CORPORA]
        return max(by_key, default=0.0)

    def validate(self) -> None:
        self._positive("seq_len", "long_doc_repeat")
        self._non_negative("seed", "workers", "long_doc_tokens")
        if not self.sources:
            self._fail("sources", "at least one source is needed")
        names = [s.name for s in self.sources]
        for name in names:
            if names.count(name) > 1:
                self._fail("sources", f"source name {name!r} is used twice")
        whole = {"chat": "conversations", "image_text": "images with their captions"}
        for kind, what in whole.items():
            if not any(s.kind == kind for s in self.sources):
                continue
            if self.packing != "documents":
                self._fail(
                    "packing",
                    f"{kind} sources train on whole {what}: set data.packing = 'documents'",
                )
            if not self.document_mask:
                self._fail(
                    "document_mask",
                    f"packed {what} must not attend to each other: set it to true",
                )
        paths = [s.path for s in self.sources]
        if PACKAGES_CORPUS in paths and any(
            p != PACKAGES_CORPUS and p.startswith("stdlib:") for p in paths
        ):
            # its documents are keyed by package, the others' by file: the held-out sets would
            # differ, and a file held out of one source would be trained on in the other
            self._fail(
                "sources",
                f"{PACKAGES_CORPUS} holds stdlib:code's files grouped by package; a mixture "
                "with it takes no other stdlib source",
            )
        weighted = [s.weight > 0 for s in self.sources]
        if any(weighted) and not all(weighted):
            self._fail("sources", "give every source a weight, or none (0 = by planned tokens)")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Optimisation and the training loop."""

    SECTION: ClassVar[str] = "train"

    steps: int = _doc(300, "optimizer steps to run")
    global_batch_size: int = _doc(16, "sequences per optimizer step, over all data-parallel ranks")
    micro_batch_size: int = _doc(8, "sequences per forward/backward on one rank")
    lr: float = _doc(1e-3, "peak learning rate")
    min_lr_ratio: float = _doc(0.1, "final learning rate as a fraction of the peak")
    lr_schedule: Literal["cosine", "constant", "wsd"] = _doc("cosine", "decay after warm-up")
    warmup_steps: int = _doc(30, "linear warm-up steps")
    wsd_decay_fraction: float = _doc(0.2, "wsd: final share of the run spent decaying")
    ramp_start_batch: int = _doc(0, "batch-size ramp-up: first global batch (sequences); 0 = off")
    ramp_increment: int = _doc(0, "batch-size ramp-up: sequences added at each increase")
    ramp_samples: int = _doc(0, "batch-size ramp-up: sequences consumed while ramping")
    weight_decay: float = _doc(0.1, "AdamW weight decay (not applied to norms and biases)")
    beta1: float = _doc(0.9, "AdamW beta1")
    beta2: float = _doc(0.95, "AdamW beta2")
    grad_clip: float = _doc(1.0, "clip the global gradient norm to this; 0 = off")
    dtype: Literal["float32", "bfloat16"] = _doc(
        "float32", "compute dtype (bf16 autocast on GPU; keep float32 on CPU, where bf16 is slow)"
    )
    activation_checkpointing: bool = _doc(False, "recompute block activations in backward")
    compile: bool = _doc(False, "torch.compile each transformer block")
    init_from: str = _doc(
        "",
        "start from these weights (an exported model folder or a training run directory) "
        "with a fresh optimizer and schedule: a continuation stage such as context extension",
    )
    freeze: tuple[str, ...] = _doc(
        (), "parameter-name patterns (fnmatch, e.g. 'layers.0.*') that this run does not train"
    )
    seed: int = _doc(0, "random seed for initialisation and data order")
    log_every: int = _doc(10, "steps between log lines")
    eval_every: int = _doc(100, "steps between held-out evaluations; 0 = never")
    eval_batches: int = _doc(0, "batches per source per evaluation; 0 = the whole held-out split")

    def validate(self) -> None:
        self._positive("steps", "global_batch_size", "micro_batch_size", "lr", "log_every")
        self._non_negative("warmup_steps", "weight_decay", "grad_clip", "eval_every", "seed")
        self._non_negative("ramp_start_batch", "ramp_increment", "ramp_samples", "eval_batches")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            self._fail("wsd_decay_fraction", f"must be in (0, 1], got {self.wsd_decay_fraction}")
        if self.ramp_start_batch:
            self._validate_ramp()
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            self._fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                self._fail(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            self._fail(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of train.micro_batch_size "
                f"({self.micro_batch_size})",
            )

    def _validate_ramp(self) -> None:
        start, step, final = self.ramp_start_batch, self.ramp_increment, self.global_batch_size
        if start >= final:
            self._fail(
                "ramp_start_batch", f"{start} must be below train.global_batch_size ({final})"
            )
        if step <= 0 or (final - start) % step:
            self._fail("ramp_increment", f"{step} must divide global_batch_size - ramp_start_batch")
        for name in ("ramp_start_batch", "ramp_increment"):
            if getattr(self, name) % self.micro_batch_size:
                self._fail(
                    name, f"must be a multiple of train.micro_batch_size ({self.micro_batch_size})"
                )
        self._positive("ramp_samples")


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """When checkpoints are written and how many are kept."""

    SECTION: ClassVar[str] = "checkpoint"

    every: int = _doc(100, "steps between checkpoints; 0 = only at the end")
    keep: int = _doc(3, "newest complete checkpoints to keep; 0 = all")

    def validate(self) -> None:
        self._non_negative("every", "keep")


@dataclass(frozen=True)
class ParallelConfig(_Section):
    """How a run is laid out over ranks (applied from outside the model)."""

    SECTION: ClassVar[str] = "parallel"

    dp_replicate: int = _doc(1, "data-parallel replicas (DDP-style)")
    dp_shard: int = _doc(1, "data-parallel ranks that shard parameters (FSDP2)")
    zero1: bool = _doc(False, "shard optimizer states only (ZeRO stage 1)")
    tp: int = _doc(1, "tensor-parallel degree (divides model.n_heads)")
    pp: int = _doc(1, "pipeline stages")
    pp_microbatches: int = _doc(1, "micro-batches per pipeline step")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = _doc("1f1b", "pipeline schedule")
    ep: int = _doc(1, "expert-parallel degree (divides model.n_experts and dp_shard)")
    cp: int = _doc(
        1,
        "context-parallel degree: ranks that split each sequence and run ring attention "
        "(GPU only; data.seq_len must divide into 2 x cp chunks)",
    )
    timeout_s: float = _doc(600.0, "seconds a collective may wait before the job fails")
    reduce_dtype: Literal["float32", "bfloat16"] = _doc(
        "float32",
        "dtype FSDP2 sums gradients in over data-parallel ranks when training in bfloat16 on "
        "GPUs: bfloat16 halves the reduce-scatter's bytes (torchtitan's "
        "mixed_precision_reduce); float32 sums as exactly as the ranks' shares allow",
    )

    reshard_after_forward: bool = _doc(
        True,
        "FSDP2: free each block's gathered weights after its forward and gather them again "
        "for its backward (ZeRO-3); false keeps them until the backward, one all-gather a "
        "block a step instead of two for a whole bf16 copy of the weights on every rank",
    )

    def validate(self) -> None:
        self._positive("dp_replicate", "dp_shard", "tp", "pp", "pp_microbatches", "ep", "cp")
        self._positive("timeout_s")
        if self.zero1 and self.dp_shard > 1:
            self._fail(
                "zero1",
                "shards optimizer states over dp_replicate ranks with parameters replicated; "
                "parallel.dp_shard > 1 (FSDP) already shards them: use one or the other",
            )
        if self.dp_shard % self.ep:
            self._fail(
                "ep",
                f"{self.ep} must divide parallel.dp_shard ({self.dp_shard}): expert parallelism "
                "shares the data-parallel ranks that shard parameters",
            )
        if self.cp > 1:
            for name in ("tp", "pp", "ep"):
                if getattr(self, name) > 1:
                    self._fail(
                        "cp",
                        f"context parallelism composes with data parallelism only, not "
                        f"parallel.{name} = {getattr(self, name)} (yet)",
                    )
            if self.zero1:
                self._fail("cp", "context parallelism shards with FSDP2; drop parallel.zero1")
        if self.pp == 1 and self.pp_schedule == "interleaved_1f1b":
            self._fail("pp_schedule", "interleaved_1f1b needs parallel.pp > 1")
        if self.pp > 1 and self.pp_schedule != "gpipe" and self.pp_microbatches < self.pp:
            self._fail(
                "pp_microbatches",
                f"{self.pp_schedule} needs at least one micro-batch per stage "
                f"(parallel.pp = {self.pp}), got {self.pp_microbatches}",
            )
        if self.pp_schedule == "interleaved_1f1b" and self.pp_microbatches % self.pp:
            self._fail(
                "pp_microbatches",
                f"interleaved_1f1b runs micro-batches in rounds of parallel.pp = {self.pp}; "
                f"got {self.pp_microbatches}",
            )

    @property
    def world_size(self) -> int:
        """Ranks the layout needs; EP borrows its ranks from dp_shard."""
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def stages_per_rank(self) -> int:
        """Model chunks each pipeline rank holds (2 for the interleaved schedule)."""
        return 2 if self.pp_schedule == "interleaved_1f1b" and self.pp > 1 else 1


@dataclass(frozen=True)
class ServeConfig(_Section):
    """The inference engine and HTTP server."""

    SECTION: ClassVar[str] = "serve"

    tp: int = _doc(1, "tensor-parallel degree of the serving engine (divides model.n_heads)")
    pp: int = _doc(1, "pipeline stages of the serving cluster (used by `moegpt plan`)")
    block_size: int = _doc(16, "tokens per paged KV-cache block")
    num_kv_blocks: int = _doc(
        0,
        "KV-cache blocks to allocate; 0 = as many as the memory budget holds (GPU: 0.9 of free "
        "memory; CPU: a share of available memory, at most what max_batch_size requests of "
        "max_model_len tokens need)",
    )
    max_model_len: int = _doc(
        0, "most tokens of one request, prompt plus output; 0 = the model's max_seq_len"
    )
    max_batch_size: int = _doc(64, "most sequences decoded in one step")
    max_tokens_per_step: int = _doc(8192, "tokens one engine step may process (prefill + decode)")
    tpot_ms: float = _doc(
        0.0, "time-per-output-token target the scheduler sizes steps for; 0 = off"
    )
    ttft_ms: float = _doc(
        0.0, "time-to-first-token target: older prompts may exceed tpot_ms; 0 = off"
    )
    decode_attention: Literal["auto", "per_sequence", "padded"] = _doc(
        "auto",
        "per_sequence (batch-invariant: greedy output independent of the batch), padded "
        "(all sequences of a step in one attention call: FlashAttention's variable-length "
        "kernel on a GPU in half precision, else one SDPA call for the decodes), auto "
        "(per_sequence on CPU, padded on GPU)",
    )
    cuda_graphs: bool = _doc(
        True,
        "on a GPU in padded mode, capture decode steps as CUDA graphs at start-up and replay "
        "them (false: every step runs eagerly, as when capture fails)",
    )
    compile: bool = _doc(
        True,
        "with decode graphs, torch.compile the decode step before capturing it (fuses its "
        "small kernels; adds compilation to start-up, cached on disk for the next start)",
    )
    overlap: Literal["auto", "on", "off"] = _doc(
        "auto",
        "plan and launch step n+1 while the device runs step n, feeding it the tokens step n "
        "draws on the device (auto: on a GPU without speculation, which needs each step's "
        "tokens on the host first)",
    )
    custom_all_reduce: bool = _doc(
        False,
        "under tp on the GPUs of one host, sum small activations through symmetric memory (one "
        "kernel reading every peer's buffer over NVLink) rather than NCCL, as vLLM does. Off by "
        "default: its kernel is faster than NCCL's alone, but decode steps measured slower with "
        "it (README, Serving)",
    )
    calibrate: bool = _doc(
        True, "time synthetic steps at start-up to fit the step-time model the targets use"
    )
    draft: str = _doc("", "draft model folder for speculative decoding (same tokenizer)")
    ngram: bool = _doc(False, "speculate with prompt lookup (n-grams) when there is no draft")
    speculation: Literal["off", "fixed", "adaptive"] = _doc(
        "adaptive",
        "with a draft or ngram: fixed proposes spec_tokens every step; adaptive picks 0.."
        "spec_tokens per sequence from its acceptance rate and the step-time model (needs "
        "calibrate; without it adaptive proposes like fixed, still gated by measured speed)",
    )
    spec_tokens: int = _doc(4, "most tokens proposed per sequence and step")
    ngram_max: int = _doc(3, "longest n-gram prompt lookup matches")
    ngram_min: int = _doc(1, "shortest n-gram prompt lookup matches")
    dtype: Literal["auto", "float32", "bfloat16"] = _doc(
        "auto",
        "precision of the served weights and KV cache: auto = bfloat16 on a GPU (a float32 "
        "export is served in half precision, as vLLM's auto serves float32 checkpoints) and "
        "the folder's own dtype on CPU, where bfloat16 matmuls are slow",
    )
    verify_weights: bool = _doc(
        True,
        "check model.safetensors against the sha256 its config.json records before loading "
        "(reads the file once more; false for huge files: its size is still checked)",
    )
    max_images: int = _doc(
        4,
        "most images one request may send to a vision model; the KV-cache budget keeps room "
        "for max_batch_size requests with this many",
    )
    host: str = _doc("127.0.0.1", "address the HTTP server binds")
    port: int = _doc(8000, "port the HTTP server listens on")
    max_body_bytes: int = _doc(
        8 * 2**20, "largest HTTP request body the server reads; larger ones get 413"
    )
    max_waiting: int = _doc(
        256,
        "requests that may wait for the engine (being read, tokenized, queued or preempted); "
        "more get 503 with Retry-After; 0 = no limit",
    )

    def validate(self) -> None:
        self._positive("tp", "pp", "block_size", "max_batch_size", "max_tokens_per_step")
        self._non_negative("num_kv_blocks", "max_model_len", "tpot_ms", "ttft_ms", "max_waiting")
        self._non_negative("max_images")
        self._positive("max_body_bytes")
        self._positive("spec_tokens", "ngram_min")
        if self.ngram_max < self.ngram_min:
            self._fail("ngram_max", f"must be >= ngram_min ({self.ngram_min})")
        if self.draft and self.ngram:
            self._fail("ngram", "choose one proposer: a draft model or n-grams")
        if not 0 < self.port < 65536:
            self._fail("port", f"must be in 1..65535, got {self.port}")


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "parallel": ParallelConfig,
    "serve": ServeConfig,
    "vision": VisionConfig,
}


@dataclass(frozen=True)
class Config:
    """A whole recipe: one instance of each section, checked against each other."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        images = [s.name for s in self.data.sources if s.kind == "image_text"]
        if images and not self.vision.enabled:
            raise ConfigError(
                f"vision.enabled: image_text source {images[0]!r} needs a model with vision"
            )
        if self.vision.clip_stage and not images:
            raise ConfigError(
                "vision.objective: the clip stage learns from image_text sources, and "
                "data.sources has none"
            )
        interleaved = [s.name for s in self.data.sources if s.interleave > 1]
        if self.vision.clip_stage and interleaved:
            raise ConfigError(
                f"data.sources: {interleaved[0]!r} interleaves its items, but the clip stage "
                "pairs each image with its caption alone (a caption's features would read the "
                "captions before it): set interleave = 1"
            )
        if self.vision.enabled and self.vision.image_token_id >= m.vocab_size:
            raise ConfigError(
                f"vision.image_token_id: {self.vision.image_token_id} is not below "
                f"model.vocab_size ({m.vocab_size})"
            )

        if self.data.seq_len > m.max_seq_len:
            raise ConfigError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len ({m.max_seq_len})"
            )
        check_parallel(m, p)
        if p.cp > 1:
            check_context_parallel(self.data, p)
            if m.n_kv_heads < m.n_heads and self.train.dtype == "float32":
                # SDPA sends grouped K/V in fp32 to its math kernel, which ring attention lacks.
                raise ConfigError(
                    "train.dtype: ring attention (parallel.cp) over shared K/V heads runs on "
                    "the flash kernel, which needs bfloat16"
                )
        if m.n_heads % self.serve.tp:
            raise ConfigError(
                f"serve.tp: {self.serve.tp} does not divide model.n_heads ({m.n_heads})"
            )
        if self.serve.pp > m.n_layers:
            raise ConfigError(
                f"serve.pp: {self.serve.pp} stages exceed model.n_layers ({m.n_layers})"
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Config:
        sections = {}
        for name, values in raw.items():
            if name not in SECTIONS:
                raise ConfigError(f"{name}: unknown section{_suggest(name, SECTIONS)}")
            if not isinstance(values, Mapping):
                raise ConfigError(f"{name}: expected a table of settings, got {values!r}")
            sections[name] = section_from_dict(SECTIONS[name], values)
        return cls(**sections)


def check_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    """The layout against the model it splits."""
    if m.n_heads % p.tp:
        raise ConfigError(f"parallel.tp: {p.tp} does not divide model.n_heads ({m.n_heads})")
    if m.n_kv_heads % p.tp and m.n_kv_heads != 1:
        # MQA's one K/V head is replicated on every TP rank (its query heads all need it);
        # other counts must split evenly.
        raise ConfigError(
            f"parallel.tp: {p.tp} does not divide model.n_kv_heads ({m.n_kv_heads}); only "
            "multi-query attention (one K/V head) is replicated over tensor-parallel ranks"
        )
    if m.n_experts == 0 and p.ep > 1:
        raise ConfigError(f"parallel.ep: {p.ep} needs experts, but model.n_experts is 0")
    if m.n_experts and m.n_experts % p.ep:
        raise ConfigError(f"parallel.ep: {p.ep} does not divide model.n_experts ({m.n_experts})")
    stages = p.pp * p.stages_per_rank
    if stages > m.n_layers:
        raise ConfigError(
            f"parallel.pp: {stages} pipeline stages exceed model.n_layers ({m.n_layers})"
        )
    if p.pp > 1 and m.tie_embeddings:
        raise ConfigError(
            "parallel.pp: tied embeddings would need the embedding on the first and the last "
            "stage; set model.tie_embeddings = false to pipeline this model"
        )


def check_context_parallel(d: DataConfig, p: ParallelConfig) -> None:
    """Ring attention's limits: causal attention only, over equal head-and-tail chunks."""
    if d.document_mask:
        raise ConfigError(
            f"data.document_mask: ring attention (parallel.cp = {p.cp}) runs causal attention "
            "only; turn the document mask off to split sequences"
        )
    if d.seq_len % (2 * p.cp):
        raise ConfigError(
            f"data.seq_len: {d.seq_len} does not split into 2 x parallel.cp = {2 * p.cp} equal "
            "chunks (each rank takes one from the head and one from the tail, for balance)"
        )


def section_from_dict(cls: type[_Section], values: Mapping[str, Any]) -> Any:
    """Build one section, rejecting keys it does not declare."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in known:
            hint = _suggest(key, known, cls.SECTION)
            raise ConfigError(f"{cls.SECTION}.{key}: unknown key{hint}")
    return cls(**values)


def _suggest(key: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    if not close:
        return ""
    return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)"


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """Read ``--section.field value`` and ``--section.field=value`` pairs into a dict."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"{arg}: expected a dotted override such as --model.n_layers 4")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key}: missing value")
            i += 1
            value = args[i]
        overrides[key] = value
        i += 1
    return overrides


def _parse_text(name: str, text: str, tp: Any) -> Any:
    """Turn a command-line string into the field's type; a bad string fails with the field name."""
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
    elif tp is int:
        try:
            return int(text)
        except ValueError:
            pass
    elif tp is float:
        try:
            return float(text)
        except ValueError:
            pass
    elif typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is str:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    else:  # str and Literal: the section's own check validates the choice
        return text
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {text!r}")


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, str]) -> dict[str, Any]:
    """Merge typed command-line overrides into a raw recipe dict (which is left unchanged)."""
    merged = {name: dict(values) for name, values in raw.items() if isinstance(values, Mapping)}
    merged.update({k: v for k, v in raw.items() if not isinstance(v, Mapping)})
    for dotted, text in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section{_suggest(section, SECTIONS)}")
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        table, _, sub_key = key.partition(".")
        sub = hints.get(table)
        if sub_key and isinstance(sub, type) and issubclass(sub, _Section):
            _override_sub_table(merged.setdefault(section, {}), table, sub, dotted, text)
            continue
        if "." in key:  # e.g. data.sources.0.epochs: a field of one table in an array
            _override_item(merged.setdefault(section, {}), cls, dotted, text)
            continue
        if key not in hints or key == "SECTION":
            known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
            raise ConfigError(f"{dotted}: unknown key{_suggest(key, known, section)}")
        merged.setdefault(section, {})[key] = _parse_text(dotted, text, hints[key])
    return merged


def _override_sub_table(
    section: dict[str, Any], table: str, cls: type[_Section], dotted: str, text: str
) -> None:
    """One field of a sub-table (``model.rope_scaling.factor``), the table's other fields as
    the recipe or the defaults have them."""
    key = dotted.rsplit(".", 1)[1]
    hints = typing.get_type_hints(cls)
    if key not in hints or key == "SECTION":
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        raise ConfigError(f"{dotted}: unknown key{_suggest(key, known, cls.SECTION)}")
    current = section.get(table, {})
    values = dict(current) if isinstance(current, Mapping) else dataclasses.asdict(current)
    values[key] = _parse_text(dotted, text, hints[key])
    section[table] = values


def _override_item(section: dict[str, Any], cls: type[_Section], dotted: str, text: str) -> None:
    _, array, index, key = [*dotted.split(".", 3), "", "", ""][:4]
    tp = typing.get_type_hints(cls).get(array)
    if typing.get_origin(tp) is not tuple:
        raise ConfigError(f"{dotted}: unknown key")
    items = section.get(array)
    if items is None:  # start from the defaults so one field can change
        items = [dataclasses.asdict(item) for item in getattr(cls(), array)]
    items = [
        dict(item) if isinstance(item, Mapping) else dataclasses.asdict(item) for item in items
    ]
    if not index.isdigit() or int(index) >= len(items):
        raise ConfigError(f"{dotted}: no such entry ({len(items)} in {cls.SECTION}.{array})")
    item_cls = typing.get_args(tp)[0]
    item_hints = typing.get_type_hints(item_cls)
    if key not in item_hints or key == "SECTION":
        known = [f.name for f in dataclasses.fields(item_cls)]
        raise ConfigError(f"{dotted}: unknown key{_suggest(key, known, dotted.rsplit('.', 1)[0])}")
    items[int(index)][key] = _parse_text(dotted, text, item_hints[key])
    section[array] = items


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, str] = ()
) -> Config:
    """Load a recipe TOML (or the built-in defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    return Config.from_dict(apply_overrides(raw, overrides))


def to_toml(config: Config, with_help: bool = True) -> str:
    """Write a config as TOML that :func:`load_config` reads back to an equal config."""
    lines: list[str] = []
    for name in SECTIONS:
        lines += _toml_table(f"[{name}]", getattr(config, name), with_help)
    return "\n".join(lines)


def _toml_table(header: str, section: Any, with_help: bool) -> list[str]:
    """One table's lines, then its arrays of tables (which TOML wants after the keys)."""
    lines, arrays = [header], []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        comment = f"  # {f.metadata['help']}" if with_help else ""
        if isinstance(value, tuple) and not all(isinstance(v, _Section) for v in value):
            items = ", ".join(_toml_value(v) for v in value)
            lines.append(f"{f.name} = [{items}]{comment}")
        elif isinstance(value, tuple):
            if with_help:
                arrays.append(f"# {f.name}:{comment[3:]}")
            for item in value:
                arrays += _toml_table(f"[[{section.SECTION}.{f.name}]]", item, with_help)
        elif isinstance(value, _Section):
            arrays += _toml_table(f"[{value.SECTION}]", value, with_help)
        else:
            lines.append(f"{f.name} = {_toml_value(value)}{comment}")
    return [*lines, "", *arrays]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    return repr(value)
