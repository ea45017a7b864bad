"""Vision evaluations (`moegpt eval --task transcribe|classify`) of an exported vision model.

- **transcribe**: each held-out rendered line is shown as ``<|image|>`` and the model writes
  greedily until end-of-text; the character error rate is the edit distance to the line over
  the line's length, summed over lines.
- **classify**: each held-out Fashion-MNIST canvas's two items are classified by likelihood,
  as Flamingo evaluates closed-set tasks: for each item the ten class names are scored as the
  continuation of its caption so far (``a `` for the first, ``a sneaker to the left of a ``
  for the second), and the most likely name is the answer. With ``shots``, that many training
  canvases and their captions come first in the same sequence, each after its own image, laid
  out as the recipe's interleaved episodes (``interleave`` on a source) train them (with
  ``augment`` on the source, those training canvases are augmented as trained; the query
  never is). The accuracy is also given per class, with each class's count.
- **gates**: tanh of each cross-attention block's attention and feed-forward gates, the share
  of the block that reaches the language model (0 when a block is closed).

The held-out items are the recipe's own validation split: read back from its prepared data
folder when that holds the source with the recipe's settings, else drawn as `moegpt
prepare` draws them. The model runs without a cache (each new token recomputes the
sequence): lines are at most 32 characters, so that costs little, and the measure stays
independent of the serving engine it could otherwise share a bug with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moegpt.config import Config, SourceConfig
from moegpt.data.images import (
    FASHION_CLASSES,
    ImageCorpus,
    image_corpus_fingerprint,
    load_image_corpus,
)
from moegpt.data.prepare import corpus_split, source_settings
from moegpt.data.shards import SplitTokens, open_split, read_manifest
from moegpt.data.tokenizer import END_OF_TEXT, IMAGE, load_tokenizer
from moegpt.errors import UserError
from moegpt.model.vision import VisionLanguageModel

CANVAS = re.compile(r"a (.+) (to the left of|above) a (.+)")


@dataclass
class HeldOut:
    """A recipe source's held-out items and, for few-shot prompts, its training items."""

    images: np.ndarray  # (n, size, size) uint8
    captions: list[str]
    train_images: Sequence[np.ndarray]
    train_captions: Sequence[str]


class _PreparedCaptions(Sequence[str]):
    """The captions of a prepared image-text split, decoded on demand from each document's
    tokens (``<|image|>``, the caption, end-of-text)."""

    def __init__(self, split: SplitTokens, tokenizer: Any) -> None:
        self.split, self.tokenizer = split, tokenizer

    def __len__(self) -> int:
        return self.split.documents

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.tokenizer.decode(self.split.document(_index(i, len(self)))[1:-1].tolist())


class _PreparedImages(Sequence[np.ndarray]):
    """The images of a prepared image-text split, read on demand."""

    def __init__(self, split: SplitTokens) -> None:
        self.split = split

    def __len__(self) -> int:
        return self.split.documents

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        image = self.split.image(_index(i, len(self)))
        assert image is not None  # an image-text split has one a document
        return image


def _index(i: int, length: int) -> int:
    """``i`` as a list takes it (negative from the end), or IndexError."""
    if not -length <= i < length:
        raise IndexError(f"item {i} of {length}")
    return int(i) % length


def held_out_items(config: Config, path: str, limit: int) -> HeldOut:
    """The first ``limit`` held-out items of the recipe's ``path`` image-text source, split
    exactly as `moegpt prepare` splits it: read back from the recipe's prepared data folder
    when it holds the source made from the same files with the same settings (seconds,
    where drawing 250,000 lines again takes minutes), else drawn again."""
    sources = [s for s in config.data.sources if s.kind == "image_text" and s.path == path]
    if not sources:
        raise UserError(f"--config: the recipe has no image_text source {path!r}")
    source: SourceConfig = sources[0]
    prepared = _prepared_items(config, source, limit)
    if prepared is not None:
        return prepared
    corpus: ImageCorpus = load_image_corpus(
        path,
        source.items,
        source.val_fraction,
        config.vision.image_size,
        config.data.seed,
        "--config",
        augment=source.augment,
        workers=config.data.worker_processes,
    )
    train, val = corpus_split(corpus, source, config.data)
    if not len(val):
        raise UserError(f"--config: source {source.name!r} holds out no items (val_fraction)")
    val = val[:limit]
    return HeldOut(
        corpus.images[val],
        [corpus.documents[i] for i in val],
        corpus.images[train],
        [corpus.documents[i] for i in train],
    )


def _prepared_items(config: Config, source: SourceConfig, limit: int) -> HeldOut | None:
    """:func:`held_out_items` from the shards `moegpt prepare` wrote (validation documents in
    the order the split drew them, each file checked against the manifest), or None when the
    data folder has no manifest or holds the source made otherwise."""
    data_dir = Path(config.data.data_dir)
    try:
        manifest = read_manifest(data_dir)
    except UserError:
        return None
    entry = manifest["sources"].get(source.name)
    settings = source_settings(source, config.data.seed, config.data.exclude_below)
    made_from = image_corpus_fingerprint(
        source.path,
        source.items,
        source.val_fraction,
        config.vision.image_size,
        config.data.seed,
        source.augment,
    )
    if entry is None or (entry.get("settings"), entry.get("fingerprint")) != (settings, made_from):
        return None  # prepared otherwise (another image size, font or Python's files)
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["file"])
    val = open_split(data_dir, manifest, source.name, "val")
    if not val.documents:
        raise UserError(f"--config: source {source.name!r} holds out no items (val_fraction)")
    train = open_split(data_dir, manifest, source.name, "train")
    count = min(limit, val.documents)
    images, captions = _PreparedImages(val), _PreparedCaptions(val, tokenizer)
    return HeldOut(
        np.stack([images[i] for i in range(count)]),
        [captions[i] for i in range(count)],
        _PreparedImages(train),
        _PreparedCaptions(train, tokenizer),
    )


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions from a to b."""
    previous = list(range(len(b) + 1))
    for i, char in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other))
            )
        previous = current
    return previous[-1]


def _special(tokenizer: Any, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise UserError(f"tokenizer.json: the model's tokenizer has no {token} token")
    return found


@torch.inference_mode()
def transcribe(
    model: VisionLanguageModel, tokenizer: Any, items: HeldOut, batch: int = 32
) -> dict[str, Any]:
    """Greedy transcriptions of ``items``: character error rate, exact-match rate, and the
    worst few lines."""
    marker, eos = _special(tokenizer, IMAGE), _special(tokenizer, END_OF_TEXT)
    device = model.image_embedding.device
    longest = max(len(tokenizer.encode(c).ids) for c in items.captions) + 8
    texts = []
    for start in range(0, len(items.captions), batch):
        images = torch.from_numpy(items.images[start : start + batch]).to(device)[:, None]
        tokens = torch.full((len(images), 1), marker, device=device)
        for _ in range(longest):
            logits = model(tokens, images).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
            if bool((tokens[:, 1:] == eos).any(dim=1).all()):
                break
        for row in tokens[:, 1:].tolist():
            texts.append(tokenizer.decode(row[: row.index(eos)] if eos in row else row))
    errors = [edit_distance(got, want) for got, want in zip(texts, items.captions, strict=True)]
    chars = sum(len(c) for c in items.captions)
    worst = sorted(range(len(texts)), key=lambda i: -errors[i] / len(items.captions[i]))[:5]
    return {
        "lines": len(texts),
        "character_error_rate": sum(errors) / chars,
        "exact_match": sum(e == 0 for e in errors) / len(texts),
        "worst": [{"line": items.captions[i], "transcribed": texts[i]} for i in worst],
    }


@dataclass
class Query:
    """One item to classify: the tokens and images before its caption, the caption so far,
    and the right name."""

    context: list[int]
    images: np.ndarray  # (images, size, size)
    prefix: str
    answer: str


def classify(
    model: VisionLanguageModel, tokenizer: Any, items: HeldOut, shots: int, seed: int
) -> dict[str, Any]:
    """Accuracy of likelihood classification of each held-out canvas's items, with ``shots``
    training canvases (drawn with ``seed``) before each query."""
    marker, eos = _special(tokenizer, IMAGE), _special(tokenizer, END_OF_TEXT)
    rng = np.random.default_rng(seed)
    queries = []
    for image, caption in zip(items.images, items.captions, strict=True):
        match = CANVAS.fullmatch(caption)
        if match is None:
            raise UserError(f"classify: {caption!r} is not a Fashion-MNIST canvas caption")
        first, relation, second = match.groups()
        picks = rng.choice(len(items.train_captions), size=shots, replace=False) if shots else []
        context = []
        for i in picks:  # as a training episode holds each item: its document (marker,
            # caption, end-of-text), then the end-of-text the packer closes every document with
            context += [marker, *tokenizer.encode(items.train_captions[i]).ids, eos, eos]
        images = np.stack([*(items.train_images[i] for i in picks), image])
        context.append(marker)
        queries.append(Query(context, images, "a ", first))
        queries.append(Query(context, images, f"a {first} {relation} a ", second))
    scores = name_scores(model, tokenizer, queries)
    right = [
        FASHION_CLASSES[int(np.argmax(row))] == q.answer
        for q, row in zip(queries, scores, strict=True)
    ]
    by_class: dict[str, list[bool]] = {}
    for query, hit in zip(queries, right, strict=True):
        by_class.setdefault(query.answer, []).append(hit)
    return {
        "items": len(queries),
        "accuracy": sum(right) / len(queries),
        "shots": shots,
        # which kinds of clothing the errors are (the dataset's shirts, T-shirts, pullovers
        # and coats are known to be confused with each other)
        "per_class": {
            name: {
                "accuracy": sum(by_class[name]) / len(by_class[name]),
                "items": len(by_class[name]),
            }
            for name in FASHION_CLASSES
            if name in by_class
        },
    }


def per_class_line(per_class: dict[str, dict[str, float]]) -> str:
    """:func:`classify`'s accuracy per class, worst first, on one line."""
    worst_first = sorted(per_class.items(), key=lambda item: item[1]["accuracy"])
    return ", ".join(f"{name} {c['accuracy']:.0%} of {c['items']:.0f}" for name, c in worst_first)


def name_scores(
    model: VisionLanguageModel, tokenizer: Any, queries: list[Query], rows_per_batch: int = 200
) -> list[list[float]]:
    """Each query's log-likelihood of each class name continuing its caption: the tokens after
    what all ten candidates' encodings share (a name may merge with the text before it). The
    candidates of many queries with as many images run as the rows of one batch."""
    by_count: dict[int, list[int]] = {}
    for i, query in enumerate(queries):
        by_count.setdefault(len(query.images), []).append(i)
    scores: list[list[float]] = [[] for _ in queries]
    for indices in by_count.values():
        group = [queries[i] for i in indices]
        for i, found in zip(indices, _scores(model, tokenizer, group, rows_per_batch), strict=True):
            scores[i] = found
    return scores


@torch.inference_mode()
def _scores(
    model: VisionLanguageModel, tokenizer: Any, queries: list[Query], rows_per_batch: int
) -> list[list[float]]:
    """:func:`name_scores` of queries with the same number of images."""
    device = model.image_embedding.device
    rows, spans, images = [], [], []
    for query in queries:
        encoded = [tokenizer.encode(query.prefix + name).ids for name in FASHION_CLASSES]
        shared = 0
        while all(len(e) > shared and e[shared] == encoded[0][shared] for e in encoded):
            shared += 1
        for ids in encoded:
            rows.append(query.context + ids)
            spans.append((len(query.context) + shared, len(query.context) + len(ids)))
            images.append(query.images)
    scores: list[float] = []
    for start in range(0, len(rows), rows_per_batch):
        chunk = rows[start : start + rows_per_batch]
        width = max(len(r) for r in chunk)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=device)
        pixels = torch.from_numpy(np.stack(images[start : start + rows_per_batch])).to(device)
        logprobs = model(tokens, pixels).logits.float().log_softmax(-1)
        # picked[:, t]: the log-probability of token t + 1 given those before it
        picked = logprobs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
        for row, (begin, end) in enumerate(spans[start : start + rows_per_batch]):
            scores.append(float(picked[row, begin - 1 : end - 1].sum()))
    names = len(FASHION_CLASSES)
    return [scores[i * names : (i + 1) * names] for i in range(len(queries))]


def gate_values(model: VisionLanguageModel) -> dict[str, dict[str, float]]:
    """tanh of each cross-attention block's gates, by the layer it stands before."""
    return {
        layer: {
            "attention": float(torch.tanh(block.attention_gate.detach().float())),
            "ffn": float(torch.tanh(block.ffn_gate.detach().float())),
        }
        for layer, block in model.xattn.items()
    }
