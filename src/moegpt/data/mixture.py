"""The training mixture: exact per-source epochs, packed sequences, rank sharding, resume.

The whole run is planned up front as one stream of documents. Each source contributes its
training documents ``epochs`` times, freshly shuffled every epoch; the sources are merged by
weighted fair queueing on tokens (a document is placed by the share of its source's planned
tokens it completes), so with the default weights every source is spread evenly over the run
and all of them end together. Every document is followed by end-of-text, and the stream is cut
into windows of ``seq_len + 1`` tokens overlapping by one (inputs and shifted labels), so each
stream token is trained on exactly once. Sequence ``g`` is a pure function of the plan, which
makes sharding (ranks take disjoint, contiguous parts of each global batch) and resuming (the
state is the number of sequences all ranks consumed) exact.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moegpt.config import DataConfig, SourceConfig
from moegpt.data.shards import SplitTokens, open_split, read_manifest
from moegpt.data.tokenizer import tokenizer_hash
from moegpt.errors import UserError

IGNORE_INDEX = -100  # label of padding: cross-entropy skips it


@dataclass(frozen=True)
class StreamPlan:
    """Which document sits where in the run's token stream."""

    doc_source: np.ndarray  # int32: source of the k-th document of the stream
    doc_index: np.ndarray  # int64: its index in that source's split
    doc_start: np.ndarray  # int64: its first token's position in the stream
    length: int  # tokens in the stream, end-of-text included
    # bool: the document opens an episode (the documents up to the next opener share one
    # document id, see ``SourceConfig.interleave``); every document does without interleaving
    doc_opens: np.ndarray


def _epoch_order(
    copies: np.ndarray, epochs: int, seed: int, name: str, shuffle: bool
) -> np.ndarray:
    """Document indices of ``epochs`` epochs, each holding document d ``copies[d]`` times."""
    pool = np.repeat(np.arange(len(copies)), copies)
    if not shuffle:
        return np.tile(pool, epochs)
    orders = [
        np.random.default_rng([seed, zlib.crc32(name.encode()), epoch]).permutation(pool)
        for epoch in range(epochs)
    ]
    return np.concatenate(orders) if orders else np.zeros(0, np.int64)


def _copies(split: SplitTokens, long_doc_tokens: int, long_doc_repeat: int) -> np.ndarray:
    """Copies of each document per epoch: ``long_doc_repeat`` for those longer than
    ``long_doc_tokens`` (when set), one for the rest. Upsampling long documents within each
    source keeps the mixture of sources while a context extension sees more long runs (Fu et
    al. 2024, "Data Engineering for Scaling Language Models to 128K Context")."""
    copies = np.ones(split.documents, dtype=np.int64)
    if long_doc_tokens:
        copies[split.doc_lengths > long_doc_tokens] = long_doc_repeat
    return copies


def plan_stream(
    splits: list[SplitTokens],
    epochs: list[int],
    weights: list[float],
    seed: int,
    shuffle: bool = True,
    long_doc_tokens: int = 0,
    long_doc_repeat: int = 1,
    episodes: list[int] | None = None,
) -> StreamPlan:
    """Merge the sources' epoch-shuffled document orders into one stream (documents longer
    than ``long_doc_tokens``, when set, ``long_doc_repeat`` times in each epoch). A source
    with ``episodes[s]`` k > 1 gives its documents in episodes of k consecutive ones (the last
    may be shorter), which the merge keeps together: each episode is placed by the share of
    the source its last document completes."""
    episodes = episodes or [1] * len(splits)
    sources, indices, finish, opens = [], [], [], []
    for s, (split, n_epochs, weight) in enumerate(zip(splits, epochs, weights, strict=True)):
        copies = _copies(split, long_doc_tokens, long_doc_repeat)
        order = _epoch_order(copies, n_epochs, seed, split.name, shuffle)
        sizes = split.doc_lengths[order] + 1  # + end-of-text
        planned = float(sizes.sum()) or 1.0
        share = weight if weight > 0 else planned  # default: sources finish together
        done = np.cumsum(sizes) / share
        # Episodes are cut within each epoch (the last one of an epoch may be shorter), so
        # none holds an item twice; an episode's documents all finish when its last does.
        k, per_epoch = episodes[s], max(int(copies.sum()), 1)
        at = np.arange(len(order))
        first = at - at % per_epoch % k
        opens.append(at == first)
        if k > 1 and len(done):
            epoch_end = (at // per_epoch + 1) * per_epoch
            done = done[np.minimum(first + k, epoch_end) - 1]
        finish.append(done)
        sources.append(np.full(len(order), s, dtype=np.int32))
        indices.append(order)
    doc_source = np.concatenate(sources) if sources else np.zeros(0, np.int32)
    doc_index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    doc_opens = np.concatenate(opens) if opens else np.zeros(0, bool)
    # lexsort is stable: documents of one episode (equal finish, same source) stay in order
    merged = np.lexsort((doc_source, np.concatenate(finish))) if finish else np.zeros(0, np.int64)
    doc_source, doc_index, doc_opens = doc_source[merged], doc_index[merged], doc_opens[merged]
    sizes = _sizes(splits, doc_source, doc_index)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return StreamPlan(doc_source, doc_index, starts[:-1], int(starts[-1]), doc_opens)


def _sizes(splits: list[SplitTokens], doc_source: np.ndarray, doc_index: np.ndarray) -> np.ndarray:
    """Tokens of each stream document, its end-of-text included."""
    sizes = np.empty(len(doc_source), dtype=np.int64)
    for s, split in enumerate(splits):
        mask = doc_source == s
        sizes[mask] = split.doc_lengths[doc_index[mask]] + 1
    return sizes


def _image_size(splits: list[SplitTokens]) -> int:
    """The pixel size of the splits' images (0: no split has images); one for all."""
    sizes = {s.images[0].shape[1] for s in splits if s.images is not None}
    if len(sizes) > 1:
        raise UserError(
            f"data.sources: image_text sources prepared at different sizes {sorted(sizes)}; "
            "re-run `moegpt prepare --config ...`"
        )
    return sizes.pop() if sizes else 0


def _check_prepared_for(
    data: DataConfig, manifest: dict[str, Any], data_dir: Path, chosen: list[SourceConfig]
) -> None:
    """The shards must come from this recipe's sources, settings and tokenizer."""
    from moegpt.data.prepare import source_settings  # prepare imports this module's siblings

    rerun = "(run `moegpt prepare --config ...`)"
    exclude_below = data.exclude_below
    for i, s in enumerate(data.sources):
        if s not in chosen:
            continue
        entry = manifest["sources"].get(s.name)
        if entry is None:
            raise UserError(f"data.sources[{i}] {s.name!r}: not prepared in {data_dir} {rerun}")
        if entry.get("settings") != source_settings(s, data.seed, exclude_below):
            raise UserError(
                f"data.sources[{i}] {s.name!r}: {data_dir} was prepared with other settings "
                f"for it {rerun}"
            )
    if data.tokenizer:
        given = Path(data.tokenizer)
        if given.is_file() and tokenizer_hash(given) != manifest["tokenizer"]["sha256"]:
            raise UserError(f"data.tokenizer: {given} is not the tokenizer the shards used {rerun}")


@dataclass(frozen=True)
class PackedDocuments:
    """Whole documents packed greedily, in stream order, into sequences of ``seq_len``:
    sequence g holds stream documents ``order[bounds[g]:bounds[g + 1]]``. Episodes are packed
    whole; ``opens`` says which stream documents open one (an episode longer than a sequence
    is packed as its separate documents)."""

    order: np.ndarray  # the stream documents kept, in order
    bounds: np.ndarray  # each sequence's first position in ``order``, then the end
    over_length: int  # documents longer than a sequence (cut to it, or left out)
    opens: np.ndarray  # bool per stream document

    @property
    def n_sequences(self) -> int:
        return len(self.bounds) - 1

    def documents_of(self, g: int) -> np.ndarray:
        return self.order[self.bounds[g] : self.bounds[g + 1]]


def pack_documents(
    sizes: np.ndarray, seq_len: int, skip_long: bool, opens: np.ndarray | None = None
) -> PackedDocuments:
    """Greedy packing of documents of ``sizes`` tokens (end-of-text included), episode by
    episode (``opens``: where each starts; None: every document is one): a sequence closes
    when the next episode would not fit. An episode longer than ``seq_len`` is packed as its
    documents; a longer document fills a sequence alone, cut to ``seq_len``, or with
    ``skip_long`` is left out."""
    opens = np.ones(len(sizes), bool) if opens is None else opens.copy()
    if len(sizes):
        episode_of = np.cumsum(opens) - 1
        too_long = np.add.reduceat(sizes, np.flatnonzero(opens)) > seq_len
        opens |= too_long[episode_of]
    firsts = np.flatnonzero(opens)
    episode_of = np.cumsum(opens) - 1
    episode_sizes = np.add.reduceat(sizes, firsts) if len(sizes) else np.zeros(0, np.int64)
    long = episode_sizes > seq_len  # single documents now
    kept = ~long if skip_long else np.ones(len(firsts), bool)
    fitted = np.minimum(episode_sizes[kept], seq_len).tolist()
    starts, used = [], seq_len
    for i, size in enumerate(fitted):
        if used + size > seq_len:
            starts.append(i)
            used = 0
        used += size
    starts.append(len(fitted))
    # episode boundaries as positions in the kept documents
    documents = np.diff(np.append(firsts, len(sizes)))[kept]
    bounds = np.concatenate([[0], np.cumsum(documents)])[starts]
    order = np.flatnonzero(kept[episode_of]) if len(sizes) else np.zeros(0, np.int64)
    return PackedDocuments(order, bounds.astype(np.int64), int(long.sum()), opens)


class Mixture:
    """Packed sequences of one split of the prepared data, in the planned order."""

    def __init__(
        self,
        splits: list[SplitTokens],
        sources: list[SourceConfig],
        seq_len: int,
        eos_id: int,
        seed: int,
        shuffle: bool = True,
        epochs: list[int] | None = None,
        identity: str = "",
        long_doc_tokens: int = 0,
        long_doc_repeat: int = 1,
        packing: str = "stream",
        long_documents: str = "truncate",
        episodes: list[int] | None = None,
    ) -> None:
        self.splits = splits
        self.sources = sources
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.epochs = epochs or [s.epochs for s in sources]
        weights = [s.weight for s in sources]
        episodes = episodes or [1] * len(sources)
        self.plan = plan_stream(
            splits, self.epochs, weights, seed, shuffle, long_doc_tokens, long_doc_repeat, episodes
        )
        self.packing = packing
        # Image-text sources give every sequence the images of its documents, in order.
        self.image_size = _image_size(splits)
        self.packed: PackedDocuments | None = None
        if packing == "documents":
            sizes = np.diff(np.append(self.plan.doc_start, self.plan.length))
            self.packed = pack_documents(
                sizes, seq_len, long_documents == "skip", self.plan.doc_opens
            )
            self.n_sequences = self.packed.n_sequences
        else:
            # Windows of seq_len + 1 tokens overlapping by one: the last may be short (padded).
            self.n_sequences = max(0, -(-(self.plan.length - 1) // seq_len))
        self.fingerprint = hashlib.sha256(
            json.dumps(
                [
                    identity,
                    seq_len,
                    seed,
                    shuffle,
                    self.epochs,
                    [(s.name, s.weight) for s in sources],
                    *([long_doc_tokens, long_doc_repeat] if long_doc_tokens else []),
                    *([packing, long_documents] if packing != "stream" else []),
                    *([episodes] if max(episodes, default=1) > 1 else []),
                ]
            ).encode()
        ).hexdigest()[:16]

    @classmethod
    def open(
        cls,
        data: DataConfig,
        split: str = "train",
        source: str | None = None,
        verify: bool = True,
    ) -> Mixture:
        """The training mixture, or (``split="val"``) one source's held-out documents once."""
        data_dir = Path(data.data_dir)
        manifest = read_manifest(data_dir)
        chosen = [s for s in data.sources if source is None or s.name == source]
        if not chosen:
            raise UserError(f"{source}: no such source in data.sources")
        _check_prepared_for(data, manifest, data_dir, chosen)
        splits = [open_split(data_dir, manifest, s.name, split, verify) for s in chosen]
        identity = json.dumps([manifest["sources"][s.name]["splits"][split] for s in chosen])
        validation = split != "train"
        return cls(
            splits,
            chosen,
            data.seq_len,
            manifest["tokenizer"]["eos_id"],
            data.seed,
            shuffle=not validation,
            epochs=[1] * len(chosen) if validation else None,
            identity=identity,
            # Held-out documents are each read once: upsampling is for training.
            long_doc_tokens=0 if validation else data.long_doc_tokens,
            long_doc_repeat=data.long_doc_repeat,
            packing=data.packing,
            long_documents=data.long_documents,
            episodes=[s.interleave for s in chosen],
        )

    def tokens_of(self, k: int) -> np.ndarray:
        """The k-th stream document's tokens (without its end-of-text)."""
        return self.splits[self.plan.doc_source[k]].document(int(self.plan.doc_index[k]))

    def mask_of(self, k: int) -> np.ndarray | None:
        """The k-th stream document's trained-on tokens (None: all of them)."""
        return self.splits[self.plan.doc_source[k]].mask(int(self.plan.doc_index[k]))

    def image_of(self, k: int) -> np.ndarray | None:
        """The k-th stream document's image (None: a text document)."""
        return self.splits[self.plan.doc_source[k]].image(int(self.plan.doc_index[k]))

    def sequence(self, g: int) -> dict[str, np.ndarray]:
        """Sequence ``g``: inputs, labels (-100 on padding), positions and document ids
        restarting at every document, for a block-diagonal mask."""
        if not 0 <= g < self.n_sequences:
            raise IndexError(f"sequence {g} outside 0..{self.n_sequences - 1}")
        if self.packed is not None:
            return self._whole_documents(g)
        start = g * self.seq_len
        end = min(start + self.seq_len + 1, self.plan.length)
        starts = self.plan.doc_start
        first = int(np.searchsorted(starts, start, side="right")) - 1
        last = int(np.searchsorted(starts, end, side="left"))
        pieces, positions, documents = [], [], []
        for k in range(first, last):
            tokens = self.tokens_of(k)  # a memory map: slice before copying anything
            lo = max(start - starts[k], 0)
            hi = min(end - starts[k], len(tokens) + 1)  # + its end-of-text
            piece = tokens[lo : min(hi, len(tokens))]
            if hi > len(tokens):
                piece = np.append(piece, self.eos_id)
            pieces.append(piece)
            # Positions restart at each document and at the window's start, so a long
            # document never shows the model positions beyond seq_len.
            positions.append(np.arange(hi - lo))
            documents.append(np.full(hi - lo, k - first))
        window = np.concatenate(pieces).astype(np.int64)
        pos = np.concatenate(positions)
        doc_ids = np.concatenate(documents)
        pad = self.seq_len + 1 - len(window)
        labels = window[1:].copy()
        if pad:
            window = np.concatenate([window, np.full(pad, self.eos_id)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX)])
            pos = np.concatenate([pos, np.zeros(pad, np.int64)])
            doc_ids = np.concatenate([doc_ids, np.full(pad, doc_ids[-1] + 1)])
        return {
            "input_ids": window[: self.seq_len],
            "labels": labels[: self.seq_len],
            "positions": pos[: self.seq_len],
            "document_ids": doc_ids[: self.seq_len],
            "padding": np.arange(self.seq_len) >= self.seq_len + 1 - pad,
        }

    def _whole_documents(self, g: int) -> dict[str, np.ndarray]:
        """Sequence ``g`` of whole documents: each with its end-of-text, labelled only inside
        itself (and, for a conversation, only on its assistant turns), padded to seq_len. The
        documents of an episode share a document id, and their positions run on."""
        assert self.packed is not None
        inputs, labels, positions, documents, images = [], [], [], [], []
        n, at = -1, 0
        for k in self.packed.documents_of(g):
            if self.packed.opens[k]:
                n, at = n + 1, 0
            image = self.image_of(k)
            if image is not None:  # its <|image|> marker comes first: never cut off
                images.append(image)
            tokens = np.append(self.tokens_of(k), self.eos_id)[: self.seq_len]
            mask = self.mask_of(k)
            # the end-of-text closing a conversation is not trained on: its turn's end is
            trained = (
                np.ones(len(tokens), bool)
                if mask is None
                else np.append(mask, 0)[: len(tokens)].astype(bool)
            )
            target = np.where(trained[1:], tokens[1:], IGNORE_INDEX)
            inputs.append(tokens)
            labels.append(np.append(target, IGNORE_INDEX))  # the last token predicts nothing
            positions.append(np.arange(at, at + len(tokens)))
            at += len(tokens)
            documents.append(np.full(len(tokens), n))
        used = sum(len(t) for t in inputs)
        pad = self.seq_len - used
        inputs.append(np.full(pad, self.eos_id))
        labels.append(np.full(pad, IGNORE_INDEX))
        positions.append(np.zeros(pad, np.int64))
        documents.append(np.full(pad, n + 1))
        sequence = {
            "input_ids": np.concatenate(inputs).astype(np.int64),
            "labels": np.concatenate(labels).astype(np.int64),
            "positions": np.concatenate(positions).astype(np.int64),
            "document_ids": np.concatenate(documents).astype(np.int64),
            "padding": np.arange(self.seq_len) >= used,
        }
        if self.image_size:
            size = self.image_size
            sequence["images"] = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
        return sequence

    def long_document_share(self, span: int) -> float:
        """The share of sequences in which one document runs more than ``span`` tokens: those
        that teach attention past a context of ``span`` (an extended model's original one)."""
        starts = self.plan.doc_start
        # The stream's last token is a label only, never an input.
        ends = np.append(starts[1:], self.plan.length - 1)
        if self.packed is not None:  # whole documents: a sequence holding a long one
            longest = np.array(
                [
                    max((ends[k] - starts[k] for k in self.packed.documents_of(g)), default=0)
                    for g in range(self.n_sequences)
                ]
            )
            return float(np.mean(longest > span)) if self.n_sequences else 0.0
        long = np.flatnonzero(ends - starts > span)
        hit = np.zeros(self.n_sequences, dtype=bool)
        size = self.seq_len
        for k in long:  # only documents longer than span can run that long in a sequence
            first, last = int(starts[k]) // size, (int(ends[k]) - 1) // size
            for g in range(first, min(last, self.n_sequences - 1) + 1):
                if min(ends[k], (g + 1) * size) - max(starts[k], g * size) > span:
                    hit[g] = True
        return float(hit.mean()) if self.n_sequences else 0.0

    def planned_tokens(self) -> list[int]:
        """Training tokens each source contributes over the run (epochs x its tokens + EOS,
        long documents counted once per copy)."""
        sizes = np.diff(np.append(self.plan.doc_start, self.plan.length))
        per_source = np.bincount(self.plan.doc_source, weights=sizes, minlength=len(self.splits))
        return [int(t) for t in per_source]


class MixtureLoader:
    """Batches of one data-parallel rank; resumable from ``state_dict()``.

    Each global batch is ``batch_size x world_size`` consecutive sequences; rank r takes the
    r-th contiguous part. The state is the number of sequences all ranks consumed, so a run
    saved at one data-parallel degree resumes at another with nothing lost or repeated.
    """

    def __init__(
        self,
        mixture: Mixture,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        document_mask: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.mixture = mixture
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.document_mask = document_mask
        self.consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "mixture": self.mixture.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mixture") != self.mixture.fingerprint:
            raise UserError(
                "data loader state comes from a different mixture (sources, epochs, weights, "
                "seed, seq_len or shards changed since the checkpoint)"
            )
        self.consumed = int(state["consumed"])

    def _rank_slice(self, global_count: int) -> range:
        base, extra = divmod(global_count, self.world_size)
        first = self.consumed + self.rank * base + min(self.rank, extra)
        return range(first, first + base + (self.rank < extra))

    def _padding_row(self) -> dict[str, np.ndarray]:
        """A row that trains on nothing (all labels ignored), to even out the last batch."""
        n, size = self.mixture.seq_len, self.mixture.image_size
        row = {
            "input_ids": np.full(n, self.mixture.eos_id, dtype=np.int64),
            "labels": np.full(n, IGNORE_INDEX, dtype=np.int64),
            "positions": np.arange(n),
            "document_ids": np.zeros(n, dtype=np.int64),
            "padding": np.ones(n, dtype=bool),
        }
        if size:
            row["images"] = np.zeros((0, size, size), np.uint8)
        return row

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of exactly ``batch_size`` rows on every rank; at the end of the stream the
        missing rows are padding whose labels are all ignored, so ranks stay in step."""
        total = self.mixture.n_sequences
        while self.consumed < total:
            global_count = min(self.batch_size * self.world_size, total - self.consumed)
            rows = [self.mixture.sequence(g) for g in self._rank_slice(global_count)]
            rows += [self._padding_row()] * (self.batch_size - len(rows))
            self.consumed += global_count
            # padding: tokens that only fill a row (the MoE layers' statistics leave them out)
            keys = ("input_ids", "labels", "padding", "positions", "document_ids")
            if not self.document_mask:
                keys = keys[:3]
            batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in keys}
            if self.mixture.image_size:
                batch["images"] = _stack_images([r["images"] for r in rows])
            yield batch


def _stack_images(per_row: list[np.ndarray]) -> torch.Tensor:
    """Rows' images (count, size, size) as (rows, most, size, size) uint8: a row with fewer
    images than the most leaves zeros, which no token attends to (it has no marker for them)."""
    most = max(len(images) for images in per_row)
    size = per_row[0].shape[1]
    out = np.zeros((len(per_row), most, size, size), np.uint8)
    for i, images in enumerate(per_row):
        out[i, : len(images)] = images
    return torch.from_numpy(out)
