"""`moegpt prepare`: sources -> tokenizer -> token shards + manifest, idempotently.

Each source is re-tokenized only when its fingerprint (files, sizes, modification times and
the settings that shape its shards) or the tokenizer changed; otherwise it is reported up to
date and left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from moegpt.chat import TOKENIZER_CONFIG, ChatTemplate, TemplateError, chatml_tokenizer_config
from moegpt.config import Config, DataConfig, SourceConfig
from moegpt.console import progress, stderr
from moegpt.data.images import ImageCorpus, load_image_corpus
from moegpt.data.shards import (
    MANIFEST,
    TOKENIZER,
    VERSION,
    read_manifest,
    token_dtype,
    write_manifest,
    write_shard,
)
from moegpt.data.sources import Corpus, load_corpus
from moegpt.data.tokenizer import (
    END_OF_TEXT,
    IMAGE,
    encode_documents,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from moegpt.errors import UserError
from moegpt.fileio import write_atomically

SHARD_TOKENS = 1 << 28  # tokens per shard file: 512 MB of uint16
CHUNK_BYTES = 1 << 20  # text handed to a worker at a time

_worker_tokenizer = None


def _worker_init(path: str, in_pool: bool = True) -> None:
    global _worker_tokenizer
    if in_pool:  # one process per core already: no threads inside each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(path)


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.uint32) for ids in encode_documents(_worker_tokenizer, texts)]


def _chunks(documents: list[str]) -> list[list[str]]:
    chunks, current, size = [], [], 0
    for doc in documents:
        current.append(doc)
        size += len(doc)
        if size >= CHUNK_BYTES:
            chunks.append(current)
            current, size = [], 0
    return [*chunks, current] if current else chunks


def tokenize(
    documents: list[str], tokenizer_path: Path, workers: int, label: str
) -> list[np.ndarray]:
    """Token ids of every document, computed by ``workers`` processes with a progress bar."""
    chunks = _chunks(documents)
    if workers <= 1:
        _worker_init(str(tokenizer_path), in_pool=False)
        results = map(_worker_encode, chunks)
        return [ids for chunk in progress(results, label, len(chunks)) for ids in chunk]
    with ProcessPoolExecutor(
        workers, initializer=_worker_init, initargs=(str(tokenizer_path),)
    ) as pool:
        results = pool.map(_worker_encode, chunks)
        return [ids for chunk in progress(results, label, len(chunks)) for ids in chunk]


def corpus_split(
    corpus: Corpus | ImageCorpus, source: SourceConfig, data: DataConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of a source's documents: an image dataset's own test split
    where it has one, else by key (:func:`split_documents`)."""
    held_out = corpus.held_out if isinstance(corpus, ImageCorpus) else None
    if held_out is not None:
        return np.flatnonzero(~held_out), np.flatnonzero(held_out)
    return split_documents(corpus.keys, source.val_fraction, data.exclude_below, data.seed)


def fraction_above(score: float) -> float:
    """The next two-significant-figure decimal above ``score``: a val_fraction that holds
    out its key."""
    digits = 1 - math.floor(math.log10(score)) if score > 0 else 2
    return round((math.floor(score * 10**digits) + 1) / 10**digits, digits)


def check_held_out_keys(
    corpora: list[tuple[SourceConfig, Corpus | ImageCorpus]], data: DataConfig
) -> None:
    """Refuse a mixture in which a key one source holds out is trained on by another. Keys
    below every source's ``exclude_below`` never are; the key a source holds out because its
    val_fraction selected none (:func:`split_documents`) may be, and the fix is to ask for
    it."""
    splits = [
        (source, corpus.keys, *corpus_split(corpus, source, data)) for source, corpus in corpora
    ]
    for i, (source, keys, _, val) in enumerate(splits):
        held = {keys[v] for v in val}
        for other, other_keys, train, _ in splits:
            trained = held.intersection(other_keys[t] for t in train)
            if other is source or not trained:
                continue
            key = min(trained)
            score = held_out_score(key, data.seed)
            raise UserError(
                f"data.sources[{i}].val_fraction: {source.val_fraction} holds out none of "
                f"{source.name!r}'s documents, so it holds out {key}, which {other.name!r} trains "
                f"on; {fraction_above(score)} holds it out of every source"
            )


def held_out_score(key: str, seed: int) -> float:
    """A document's uniform [0, 1) draw for the validation split, from its key alone."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    keys: list[str], fraction: float, exclude_below: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices.

    A document is held out when its key's score is below ``fraction`` and trained on only when
    its score is at least ``exclude_below`` (the largest fraction of any source): documents
    sharing a key across sources, like a stdlib file's code and its docstrings, are held out
    together, so no source's validation text ever appears in another's training data. A
    source whose ``fraction`` selects no key holds out its lowest-scoring key when it has two
    keys or more (every document of it; :func:`check_held_out_keys` refuses a mixture in
    which another source trains on that key).
    """
    scores = np.array([held_out_score(k, seed) for k in keys])
    val = np.flatnonzero(scores < fraction)
    if fraction > 0 and not len(val) and len(set(keys)) >= 2:
        val = np.flatnonzero(scores == scores.min())
    train_mask = scores >= exclude_below
    train_mask[val] = False
    return np.flatnonzero(train_mask), val


def shaping_settings(source: SourceConfig) -> dict[str, Any]:
    """The source's settings that shape its documents: not epochs, weight and interleave,
    which only steer the mixture, nor ``items`` outside image-text sources nor ``augment``
    while off (so that folders prepared before those fields existed stay up to date)."""
    unused = ("epochs", "weight", "interleave")
    unused += () if source.kind == "image_text" else ("items",)
    unused += () if source.augment else ("augment",)
    return {k: v for k, v in asdict(source).items() if k not in unused}


def source_settings(source: SourceConfig, seed: int, exclude_below: float) -> dict[str, Any]:
    """What shapes a source's shards besides its files (changing anything else re-tokenizes
    nothing)."""
    return {**shaping_settings(source), "seed": seed, "exclude_below": exclude_below}


def _up_to_date(
    entry: dict | None, fingerprint: str, settings: dict, tok_sha: str, folder: Path, itemsize: int
) -> bool:
    """Same inputs, same settings, and every shard file present at its recorded size."""
    if not entry or (entry.get("fingerprint"), entry.get("tokenizer_sha256")) != (
        fingerprint,
        tok_sha,
    ):
        return False
    if entry.get("settings") != settings:
        return False
    for split in entry["splits"].values():
        for shard in split["shards"]:
            sizes = {
                shard["tokens_file"]: shard["tokens"] * itemsize,
                shard["docs_file"]: (shard["documents"] + 1) * 8,
            }
            if "mask_file" in shard:
                sizes[shard["mask_file"]] = shard["tokens"]
            if "images_file" in shard:
                sizes[shard["images_file"]] = shard["documents"] * shard["image_size"] ** 2
            for name, size in sizes.items():
                path = folder / name
                if not path.is_file() or path.stat().st_size != size:
                    return False
    return True


def _write_split(
    folder: Path,
    prefix: str,
    docs: list[np.ndarray],
    dtype: np.dtype,
    masks: list[np.ndarray] | None = None,
    images: np.ndarray | None = None,
) -> dict:
    """Shards of at most SHARD_TOKENS tokens (at least one, possibly empty)."""
    shards: list[dict] = []
    start, count = 0, 0

    def flush(end: int) -> None:
        part = None if masks is None else masks[start:end]
        pictures = None if images is None else images[start:end]
        name = f"{prefix}-{len(shards):05d}"
        shards.append(write_shard(folder, name, docs[start:end], dtype, part, pictures))

    for k, doc in enumerate(docs):
        count += len(doc)
        if count >= SHARD_TOKENS:
            flush(k + 1)
            start, count = k + 1, 0
    if start < len(docs) or not shards:
        flush(len(docs))
    return {
        "documents": len(docs),
        "tokens": int(sum(len(d) for d in docs)),
        "shards": shards,
    }


# A new tokenizer is staged under a temporary name and moved into place just before the
# manifest that records it, so an interrupted run leaves the previous tokenizer with its shards.
STAGED_TOKENIZER = f".{TOKENIZER}.next"
RECIPE_STAMP = ".tokenizer-recipe"


def _tokenizer_for(
    config: Config,
    data_dir: Path,
    corpora: list[tuple[SourceConfig, Corpus]],
    log: Callable[[str], None],
) -> tuple[Path, str | None]:
    """The tokenizer file to use: the configured one, or one trained on the training splits;
    and the recipe stamp to record once it is in place (None for a configured one). A new
    tokenizer is returned at its staged path: see :func:`_commit_tokenizer`."""
    path = data_dir / TOKENIZER
    staged = data_dir / STAGED_TOKENIZER
    if config.data.tokenizer:  # copied in, so the prepared folder is self-contained
        given = Path(config.data.tokenizer)
        tokenizer = load_tokenizer(given)
        if tokenizer.get_vocab_size() > config.model.vocab_size:
            raise UserError(
                f"{given}: {tokenizer.get_vocab_size()} tokens exceed model.vocab_size "
                f"({config.model.vocab_size})"
            )
        if path.is_file() and tokenizer_hash(path) == tokenizer_hash(given):
            return path, None
        write_atomically(staged, given.read_bytes())
        return staged, None
    shaping = [shaping_settings(s) for s in config.data.sources]
    recipe = hashlib.sha256(
        repr((shaping, config.data.seed, config.model.vocab_size)).encode()
    ).hexdigest()
    stamp = data_dir / RECIPE_STAMP
    recipe += _corpora_fingerprint(corpora)
    if path.is_file() and stamp.is_file() and stamp.read_text() == recipe:
        return path, recipe
    log(f"training a {config.model.vocab_size}-token byte-level BPE on the recipe's training split")
    texts = []
    for source, corpus in corpora:
        train, _ = corpus_split(corpus, source, config.data)
        documents = corpus.documents
        if source.kind == "chat":
            documents = [_conversation_text(d) for d in documents]
        texts += [documents[i] for i in train]
    tokenizer = train_tokenizer(texts, config.model.vocab_size)
    write_atomically(staged, tokenizer.to_str().encode())
    return staged, recipe


def _commit_tokenizer(data_dir: Path, tokenizer_path: Path, recipe: str | None) -> None:
    """Move a staged tokenizer into place and record (or forget) its recipe."""
    if tokenizer_path != data_dir / TOKENIZER:
        os.replace(tokenizer_path, data_dir / TOKENIZER)
    stamp = data_dir / RECIPE_STAMP
    if recipe is None:
        stamp.unlink(missing_ok=True)
    elif not stamp.is_file() or stamp.read_text() != recipe:
        write_atomically(stamp, recipe.encode())


def _tokenizer_config(given_tokenizer: str) -> tuple[bytes, str]:
    """The chat template travels with the tokenizer: a configured tokenizer's own
    tokenizer_config.json (from beside it), else moegpt's ChatML; and where it comes from."""
    beside = Path(given_tokenizer).with_name(TOKENIZER_CONFIG) if given_tokenizer else None
    if beside is not None and beside.is_file():
        return beside.read_bytes(), str(beside)
    return chatml_tokenizer_config().encode(), "moegpt's ChatML"


def _commit_chat_template(data_dir: Path, config_text: bytes) -> None:
    path = data_dir / TOKENIZER_CONFIG
    if not path.is_file() or path.read_bytes() != config_text:  # a re-run rewrites nothing
        write_atomically(path, config_text)


def _conversation_text(document: str) -> str:
    """What a tokenizer trained on the corpus learns from a conversation: its contents."""
    return "\n".join(m["content"] for m in json.loads(document))


def encode_conversations(
    template: ChatTemplate, documents: list[str], keys: list[str], label: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each conversation's token ids and trained-on mask (its assistant turns); one that
    cannot be rendered is named by its key (a JSONL file's ``path:line``)."""
    ids, masks = [], []
    for document, key in progress(zip(documents, keys, strict=True), label, len(documents)):
        try:
            encoded = template.encode_with_labels(json.loads(document))
        except TemplateError as e:
            raise UserError(f"{key}: {e}") from None
        ids.append(np.asarray(encoded.ids, dtype=np.uint32))
        masks.append(np.asarray(encoded.labels, dtype=np.uint8))
    return ids, masks


def encode_captions(tokenizer: Any, captions: list[str], where: str) -> tuple[list, list]:
    """Each image-text document as ``<|image|>``, its caption and end-of-text, with the
    caption and its end-of-text trained on, so the model learns where a caption stops (the
    marker is an input, never a target; the end-of-text the packer appends after every
    document is not trained on, as after a conversation)."""
    marker, eos = tokenizer.token_to_id(IMAGE), tokenizer.token_to_id(END_OF_TEXT)
    if marker is None:
        raise UserError(f"{where}: the tokenizer has no {IMAGE} token to mark images with")
    ids, masks = [], []
    for caption in encode_documents(tokenizer, captions):
        ids.append(np.asarray([marker, *caption, eos], dtype=np.uint32))
        masks.append(np.asarray([0] + [1] * (len(caption) + 1), dtype=np.uint8))
    return ids, masks


def _corpora_fingerprint(corpora: list[tuple[SourceConfig, Corpus]]) -> str:
    return hashlib.sha256("".join(c.fingerprint for _, c in corpora).encode()).hexdigest()


def prepare(
    config: Config, log: Callable[[str], None] = lambda m: stderr.print(m, highlight=False)
) -> dict[str, Any]:
    """Bring ``config.data.data_dir`` up to date with the recipe; return the manifest."""
    data = config.data
    data_dir = Path(data.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"data.data_dir: {data_dir} exists and is not a folder")
    data_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporary_files(data_dir)
    try:  # a v1 manifest (no checksum) is upgraded: its shards are reused when up to date
        previous = (
            read_manifest(data_dir, old_versions=True) if (data_dir / MANIFEST).is_file() else {}
        )
    except UserError:
        previous = {}  # unreadable, edited or inconsistent: rebuild everything, trust nothing
    workers = data.worker_processes
    exclude_below = data.exclude_below

    corpora: list[tuple[SourceConfig, Corpus | ImageCorpus]] = []
    for i, source in enumerate(data.sources):
        log(f"checking source {source.name!r} ({source.path})")
        if source.kind == "image_text":
            where = f"data.sources[{i}].path"
            size = config.vision.image_size
            # (a progress bar or status line of its own: rich shows one live display at once)
            corpus: Corpus | ImageCorpus = load_image_corpus(
                source.path,
                source.items,
                source.val_fraction,
                size,
                data.seed,
                where,
                augment=source.augment,
                workers=workers,
            )
        else:
            corpus = load_corpus(source, i)
        corpora.append((source, corpus))
    check_held_out_keys(corpora, data)

    tokenizer_path, recipe = _tokenizer_for(config, data_dir, corpora, log)
    tok_sha = tokenizer_hash(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    config_text, config_from = _tokenizer_config(data.tokenizer)
    template_sha = hashlib.sha256(config_text).hexdigest()
    dtype = token_dtype(tokenizer.get_vocab_size())
    same_tokenizer = previous.get("tokenizer", {}).get("sha256") == tok_sha
    old_sources = previous.get("sources", {}) if same_tokenizer else {}

    sources: dict[str, Any] = {}
    for i, (source, corpus) in enumerate(corpora):
        folder = data_dir / source.name
        settings = source_settings(source, data.seed, exclude_below)
        entry = old_sources.get(source.name)
        chat = source.kind == "chat"
        # A conversation's tokens depend on the chat template too.
        fingerprint = corpus.fingerprint + (f":template-{template_sha}" if chat else "")
        if _up_to_date(entry, fingerprint, settings, tok_sha, folder, dtype.itemsize):
            log(f"source {source.name!r}: up to date")
            sources[source.name] = entry
            continue
        documents = corpus.documents
        if not documents:
            raise UserError(f"data.sources[{i}] {source.name!r}: no documents in {source.path}")
        masks: list[np.ndarray] | None = None
        images = corpus.images if isinstance(corpus, ImageCorpus) else None
        if images is not None:
            ids, masks = encode_captions(tokenizer, documents, f"data.sources[{i}]")
        elif chat:
            template = ChatTemplate.from_config(config_text, tokenizer, config_from)
            if template is None:
                raise UserError(
                    f"data.sources[{i}] {source.name!r}: conversations need a chat template, "
                    f"and {config_from} has none"
                )
            ids, masks = encode_conversations(
                template, documents, corpus.keys, f"rendering {source.name}"
            )
        else:
            ids = tokenize(documents, tokenizer_path, workers, f"tokenizing {source.name}")
        train, val = corpus_split(corpus, source, data)
        # New inputs or settings give new file names: the old shards stay readable until the
        # new manifest replaces the old one.
        stem = hashlib.sha256(f"{fingerprint}{settings}{tok_sha}".encode()).hexdigest()
        splits = {
            split: _write_split(
                folder,
                f"{split}-{stem[:16]}",
                [ids[j] for j in indices],
                dtype,
                None if masks is None else [masks[j] for j in indices],
                None if images is None else images[indices],
            )
            for split, indices in (("train", train), ("val", val))
        }
        sources[source.name] = {
            "kind": source.kind,
            "fingerprint": fingerprint,
            "settings": settings,
            "tokenizer_sha256": tok_sha,
            "files": len(corpus.files),
            "bytes": sum(len(d.encode("utf-8")) for d in documents),
            "splits": splits,
        }
        log(
            f"source {source.name!r}: {len(ids):,} "
            f"{'images with captions' if images is not None else 'documents'}, "
            f"{splits['train']['tokens']:,} training and "
            f"{splits['val']['tokens']:,} validation tokens"
        )
    manifest = {
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": tok_sha,
            "vocab_size": tokenizer.get_vocab_size(),
            "eos_id": tokenizer.token_to_id(END_OF_TEXT),
        },
        "dtype": dtype.name,
        "sources": sources,
    }
    _commit_tokenizer(data_dir, tokenizer_path, recipe)
    _commit_chat_template(data_dir, config_text)
    changed = {k: previous.get(k) for k in manifest} != manifest
    if changed or previous.get("version") != VERSION:  # only when something changed
        write_manifest(data_dir, manifest)
        _remove_unreferenced(data_dir, sources)
    return read_manifest(data_dir)


def _remove_temporary_files(data_dir: Path) -> None:
    """Remove what a killed run left half-written (temporary names start with a dot)."""
    patterns = (".*.bin.*", f".{MANIFEST}.*", f".{TOKENIZER}.*", f"..{TOKENIZER}.*", "*/.*.bin.*")
    for pattern in patterns:
        for path in data_dir.glob(pattern):
            path.unlink(missing_ok=True)


SHARD_SUFFIXES = (".tokens.bin", ".docs.bin", ".mask.bin", ".images.bin")


def _remove_unreferenced(data_dir: Path, sources: dict[str, Any]) -> None:
    """Delete shard files (and source folders) the new manifest no longer names."""
    for folder in data_dir.iterdir():
        if not folder.is_dir():
            continue
        if folder.name not in sources:
            if any(p.name.endswith(SHARD_SUFFIXES) for p in folder.iterdir()):
                shutil.rmtree(folder)
            continue
        keep = {
            shard[key]
            for split in sources[folder.name]["splits"].values()
            for shard in split["shards"]
            for key in ("tokens_file", "docs_file", "mask_file", "images_file")
            if key in shard
        }
        for path in folder.iterdir():
            if path.name.endswith(SHARD_SUFFIXES) and path.name not in keep:
                path.unlink()
