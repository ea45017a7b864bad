"""`moegpt prepare`: sources -> tokenizer -> token shards + manifest, idempotently.

Each source is re-tokenized only when its fingerprint (files, sizes, modification times and
the settings that shape its shards) or the tokenizer changed; otherwise it is reported up to
date and left alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from moegpt.config import Config, SourceConfig
from moegpt.console import progress, stderr
from moegpt.data.shards import (
    MANIFEST,
    TOKENIZER,
    read_manifest,
    token_dtype,
    write_atomically,
    write_manifest,
    write_shard,
)
from moegpt.data.sources import Corpus, load_corpus
from moegpt.data.tokenizer import (
    END_OF_TEXT,
    encode_documents,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)
from moegpt.errors import UserError

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


def split_documents(n: int, fraction: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices: a seeded draw of ``fraction`` of them for
    validation (at least one when there are two or more), the rest for training, both sorted."""
    if fraction <= 0 or n < 2:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    held = min(max(1, round(fraction * n)), n - 1)
    order = rng.permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def _settings(source: SourceConfig, seed: int) -> dict[str, Any]:
    """What shapes a source's shards besides its files."""
    return {**asdict(source), "seed": seed, "epochs": None, "weight": None}


def _up_to_date(
    entry: dict | None, fingerprint: str, settings: dict, tok_sha: str, folder: Path
) -> bool:
    if (
        not entry
        or entry.get("fingerprint") != fingerprint
        or entry.get("tokenizer_sha256") != tok_sha
    ):
        return False
    if entry.get("settings") != settings:
        return False
    for split in entry["splits"].values():
        for shard in split["shards"]:
            if (
                not (folder / shard["tokens_file"]).is_file()
                or not (folder / shard["docs_file"]).is_file()
            ):
                return False
    return True


def _tokenizer_for(
    config: Config,
    data_dir: Path,
    corpora: list[tuple[SourceConfig, Corpus]],
    log: Callable[[str], None],
) -> Path:
    """The tokenizer file to use: the configured one, or one trained on the training splits."""
    if config.data.tokenizer:
        path = Path(config.data.tokenizer)
        tokenizer = load_tokenizer(path)
        if tokenizer.get_vocab_size() > config.model.vocab_size:
            raise UserError(
                f"{path}: {tokenizer.get_vocab_size()} tokens exceed model.vocab_size "
                f"({config.model.vocab_size})"
            )
        return path
    path = data_dir / TOKENIZER
    recipe = hashlib.sha256(
        repr([(asdict(s), config.data.seed) for s in config.data.sources]).encode()
        + str(config.model.vocab_size).encode()
    ).hexdigest()
    stamp = data_dir / ".tokenizer-recipe"
    recipe += _corpora_fingerprint(corpora)
    if path.is_file() and stamp.is_file() and stamp.read_text() == recipe:
        return path
    log(f"training a {config.model.vocab_size}-token byte-level BPE on the recipe's training split")
    texts = []
    for source, corpus in corpora:
        train, _ = split_documents(
            len(corpus.documents), source.val_fraction, config.data.seed, source.name
        )
        texts += [corpus.documents[i] for i in train]
    tokenizer = train_tokenizer(texts, config.model.vocab_size)
    write_atomically(path, tokenizer.to_str().encode())
    write_atomically(stamp, recipe.encode())
    return path


def _corpora_fingerprint(corpora: list[tuple[SourceConfig, Corpus]]) -> str:
    return hashlib.sha256("".join(c.fingerprint for _, c in corpora).encode()).hexdigest()


def prepare(
    config: Config, log: Callable[[str], None] = lambda m: stderr.print(m, highlight=False)
) -> dict[str, Any]:
    """Bring ``config.data.data_dir`` up to date with the recipe; return the manifest."""
    data = config.data
    data_dir = Path(data.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        previous = read_manifest(data_dir) if (data_dir / MANIFEST).is_file() else {}
    except UserError:
        previous = {}  # unreadable: rebuild everything rather than trust it
    workers = data.workers or os.cpu_count() or 1

    corpora = []
    for i, source in enumerate(data.sources):
        log(f"checking source {source.name!r} ({source.path})")
        corpora.append((source, load_corpus(source, i)))

    tokenizer_path = _tokenizer_for(config, data_dir, corpora, log)
    tok_sha = tokenizer_hash(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.get_vocab_size())
    old_sources = (
        previous.get("sources", {})
        if previous.get("tokenizer", {}).get("sha256") == tok_sha
        else {}
    )

    sources: dict[str, Any] = {}
    for source, corpus in corpora:
        folder = data_dir / source.name
        settings = _settings(source, data.seed)
        entry = old_sources.get(source.name)
        if _up_to_date(entry, corpus.fingerprint, settings, tok_sha, folder):
            log(f"source {source.name!r}: up to date")
            sources[source.name] = entry
            continue
        ids = tokenize(corpus.documents, tokenizer_path, workers, f"tokenizing {source.name}")
        train, val = split_documents(len(ids), source.val_fraction, data.seed, source.name)
        stem = corpus.fingerprint[:8] + tok_sha[:8]
        splits = {}
        for split, indices in (("train", train), ("val", val)):
            shards, current, count = [], [], 0
            for index in indices:
                current.append(ids[index])
                count += len(ids[index])
                if count >= SHARD_TOKENS:
                    shards.append(
                        write_shard(folder, f"{split}-{stem}-{len(shards):05d}", current, dtype)
                    )
                    current, count = [], 0
            if current or not shards:
                shards.append(
                    write_shard(folder, f"{split}-{stem}-{len(shards):05d}", current, dtype)
                )
            splits[split] = {
                "documents": len(indices),
                "tokens": int(sum(len(ids[j]) for j in indices)),
                "shards": shards,
            }
        sources[source.name] = {
            "kind": source.kind,
            "fingerprint": corpus.fingerprint,
            "settings": settings,
            "tokenizer_sha256": tok_sha,
            "files": len(corpus.files),
            "bytes": corpus.bytes,
            "splits": splits,
        }
        log(
            f"source {source.name!r}: {len(ids):,} documents, "
            f"{splits['train']['tokens']:,} training and "
            f"{splits['val']['tokens']:,} validation tokens"
        )
    manifest = {
        "tokenizer": {
            "file": os.path.relpath(tokenizer_path.resolve(), data_dir.resolve()),
            "sha256": tok_sha,
            "vocab_size": tokenizer.get_vocab_size(),
            "eos_id": tokenizer.token_to_id(END_OF_TEXT),
        },
        "dtype": dtype.name,
        "sources": sources,
    }
    if {k: previous.get(k) for k in manifest} != manifest:  # nothing changed: touch nothing
        write_manifest(data_dir, manifest)
        _remove_unreferenced(data_dir, sources)
    return read_manifest(data_dir)


def _remove_unreferenced(data_dir: Path, sources: dict[str, Any]) -> None:
    """Delete shard files (and source folders) the new manifest no longer names."""
    for folder in data_dir.iterdir():
        if not folder.is_dir():
            continue
        if folder.name not in sources:
            if any(p.name.endswith((".tokens.bin", ".docs.bin")) for p in folder.iterdir()):
                shutil.rmtree(folder)
            continue
        keep = {
            shard[key]
            for split in sources[folder.name]["splits"].values()
            for shard in split["shards"]
            for key in ("tokens_file", "docs_file")
        }
        for path in folder.iterdir():
            if path.name.endswith((".tokens.bin", ".docs.bin")) and path.name not in keep:
                path.unlink()
