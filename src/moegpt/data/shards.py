"""Token shards on disk: flat arrays plus a manifest that says what they are.

A prepared data folder holds ``tokenizer.json``, ``manifest.json`` and one folder per source
with, per split and shard, ``*.tokens.bin`` (all documents' token ids back to back, uint16
when the vocabulary fits, else uint32) and ``*.docs.bin`` (int64 offsets of each document in
the tokens, plus the end). Files are written under a temporary name and renamed, new shards
get new names, and the manifest is replaced last: an interrupted preparation leaves the
previous data readable. Loading checks every file's size and checksum against the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moegpt.errors import UserError
from moegpt.fileio import sha256_file, write_atomically

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = "moegpt-shards"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(
    folder: Path, stem: str, documents: list[np.ndarray], dtype: np.dtype
) -> dict[str, Any]:
    """Write one shard of documents; return its manifest entry."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    tokens = (np.concatenate(documents) if documents else np.zeros(0)).astype(
        dtype.newbyteorder("<")
    )
    entry = {"tokens": int(offsets[-1]), "documents": len(documents)}
    for kind, array in (("tokens", tokens), ("docs", offsets)):
        name = f"{stem}.{kind}.bin"
        data = array.tobytes()
        write_atomically(folder / name, data)
        entry[f"{kind}_file"] = name
        entry[f"{kind}_sha256"] = hashlib.sha256(data).hexdigest()
    return entry


def read_manifest(data_dir: Path) -> dict[str, Any]:
    path = data_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: not found; run `moegpt prepare --config ...` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or (manifest.get("format"), manifest.get("version")) != (
        FORMAT,
        VERSION,
    ):
        raise UserError(f"{path}: not a moegpt shard manifest (format {FORMAT} v{VERSION})")
    try:
        np.dtype(manifest["dtype"])
        {manifest["tokenizer"][k] for k in ("file", "sha256", "vocab_size", "eos_id")}
        for entry in manifest["sources"].values():
            for split in ("train", "val"):
                for shard in entry["splits"][split]["shards"]:
                    {shard[k] for k in ("tokens_file", "docs_file", "tokens", "documents")}
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: incomplete manifest ({type(e).__name__}: {e})") from None
    return manifest


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "version": VERSION, **manifest}
    write_atomically(data_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


@dataclass
class SplitTokens:
    """One source split as memory maps: document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``,
    across the split's shards."""

    name: str
    shards: list[tuple[np.ndarray, np.ndarray]]  # (tokens, offsets) per shard
    doc_lengths: np.ndarray  # int64, all documents of the split in order
    doc_shard: np.ndarray  # which shard each document lives in
    doc_local: np.ndarray  # its index inside that shard

    @property
    def documents(self) -> int:
        return len(self.doc_lengths)

    @property
    def tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def document(self, i: int) -> np.ndarray:
        tokens, offsets = self.shards[self.doc_shard[i]]
        j = self.doc_local[i]
        return tokens[offsets[j] : offsets[j + 1]]


def _check_file(path: Path, expected_bytes: int, expected_sha: str, verify: bool) -> None:
    if not path.is_file():
        raise UserError(f"{path}: shard file missing (re-run `moegpt prepare`)")
    size = path.stat().st_size
    if size != expected_bytes:
        raise UserError(f"{path}: {size} bytes, the manifest says {expected_bytes} (truncated?)")
    if verify and sha256_file(path) != expected_sha:
        raise UserError(f"{path}: checksum differs from the manifest (corrupt or from another run)")


def open_split(
    data_dir: Path, manifest: dict[str, Any], source: str, split: str, verify: bool = True
) -> SplitTokens:
    """Memory-map one split of one source, checking each file against the manifest."""
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    entry = manifest["sources"][source]["splits"][split]
    shards, lengths, shard_ids, local = [], [], [], []
    for k, shard in enumerate(entry["shards"]):
        tokens_path = data_dir / source / shard["tokens_file"]
        docs_path = data_dir / source / shard["docs_file"]
        _check_file(tokens_path, shard["tokens"] * dtype.itemsize, shard["tokens_sha256"], verify)
        _check_file(docs_path, (shard["documents"] + 1) * 8, shard["docs_sha256"], verify)
        tokens = (
            np.memmap(tokens_path, dtype=dtype, mode="r") if shard["tokens"] else np.zeros(0, dtype)
        )
        offsets = np.fromfile(docs_path, dtype="<i8")
        if offsets[-1] != shard["tokens"] or np.any(np.diff(offsets) < 0):
            raise UserError(f"{docs_path}: document offsets do not match the tokens file")
        shards.append((tokens, offsets))
        lengths.append(np.diff(offsets))
        shard_ids.append(np.full(shard["documents"], k, dtype=np.int32))
        local.append(np.arange(shard["documents"], dtype=np.int64))
    return SplitTokens(
        name=source,
        shards=shards,
        doc_lengths=np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
        doc_shard=np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32),
        doc_local=np.concatenate(local) if local else np.zeros(0, np.int64),
    )
