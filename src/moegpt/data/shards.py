"""Token shards on disk: flat arrays plus a manifest that says what they are.

A prepared data folder holds ``tokenizer.json``, ``manifest.json`` and one folder per source
with, per split and shard, ``*.tokens.bin`` (all documents' token ids back to back, uint16
when the vocabulary fits, else uint32), ``*.docs.bin`` (int64 offsets of each document in
the tokens, plus the end) and, for conversations and image captions, ``*.mask.bin`` (one byte
a token: 1 where training learns it: the assistant's turns, the caption). Image-text shards
add ``*.images.bin``: each document's image, grey uint8 pixels (documents, size, size).
Files are written under a temporary name and renamed, new shards get new names, and the
manifest is replaced last: an interrupted preparation leaves the previous data readable.
Loading checks every file's size and checksum against the manifest.
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
VERSION = 2  # v2: the manifest carries a checksum of its contents


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_shard(
    folder: Path,
    stem: str,
    documents: list[np.ndarray],
    dtype: np.dtype,
    masks: list[np.ndarray] | None = None,
    images: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write one shard of documents (and, for conversations and captions, which tokens are
    trained on: one byte a token; for image-text documents, each one's image); return its
    manifest entry."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
    tokens = (np.concatenate(documents) if documents else np.zeros(0)).astype(
        dtype.newbyteorder("<")
    )
    entry = {"tokens": int(offsets[-1]), "documents": len(documents)}
    arrays = [("tokens", tokens), ("docs", offsets)]
    if masks is not None:
        arrays.append(("mask", np.concatenate(masks).astype(np.uint8) if masks else tokens[:0]))
    if images is not None:
        if images.shape[0] != len(documents) or images.ndim != 3:
            raise ValueError(f"{images.shape} images for {len(documents)} documents")
        entry["image_size"] = int(images.shape[1])
        arrays.append(("images", np.ascontiguousarray(images, dtype=np.uint8)))
    for kind, array in arrays:
        name = f"{stem}.{kind}.bin"
        data = array.tobytes()
        write_atomically(folder / name, data)
        entry[f"{kind}_file"] = name
        entry[f"{kind}_sha256"] = hashlib.sha256(data).hexdigest()
    return entry


RERUN = "re-run `moegpt prepare --config ...`"


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of everything but the checksum."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _dotted(keys: tuple[str | int, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


def _field(path: Path, obj: Any, keys: tuple[str | int, ...], kind: type) -> Any:
    """``obj[k0][k1]...`` (str keys index objects, int keys lists), which must be of
    ``kind``: a one-line error naming the field otherwise."""
    value = obj
    for key in keys:
        if isinstance(key, int):  # only ever an index the caller took from the list itself
            found = isinstance(value, list) and 0 <= key < len(value)
        else:
            found = isinstance(value, dict) and key in value
        if not found:
            raise UserError(f"{path}: field {_dotted(keys)} is missing ({RERUN})")
        value = value[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UserError(f"{path}: field {_dotted(keys)} = {value!r} has the wrong type ({RERUN})")
    return value


def _plain_name(path: Path, dotted: str, name: str) -> None:
    """A file or folder name that stays inside its folder: no separators, no ``..``."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise UserError(f"{path}: field {dotted} = {name!r} is not a plain file name")


def tokenizer_file(data_dir: Path, manifest: dict[str, Any]) -> Path:
    """The manifest's tokenizer file, which must lie inside ``data_dir``: a relative path
    without ``..`` that does not resolve (through symlinks) out of the folder."""
    where = data_dir / MANIFEST
    name = _field(where, manifest, ("tokenizer", "file"), str)
    relative = Path(name)
    if not name or relative.is_absolute() or ".." in relative.parts:
        raise UserError(
            f"{where}: field tokenizer.file = {name!r} must be a path inside {data_dir}"
        )
    path = data_dir / relative
    if not path.resolve().is_relative_to(data_dir.resolve()):
        raise UserError(f"{where}: field tokenizer.file = {name!r} resolves outside {data_dir}")
    return path


def _check_tokenizer(data_dir: Path, manifest: dict[str, Any]) -> None:
    """The tokenizer file is the one the shards were made with, and the manifest's eos_id,
    vocab_size and dtype are what it implies."""
    from moegpt.data.tokenizer import END_OF_TEXT, load_tokenizer, tokenizer_hash

    where = data_dir / MANIFEST
    path = tokenizer_file(data_dir, manifest)
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file missing ({RERUN})")
    if tokenizer_hash(path) != manifest["tokenizer"]["sha256"]:
        raise UserError(
            f"{path}: sha256 differs from {MANIFEST}'s tokenizer.sha256 (edited or replaced "
            f"since the shards were made; {RERUN})"
        )
    tokenizer = load_tokenizer(path)
    vocab, eos = tokenizer.get_vocab_size(), tokenizer.token_to_id(END_OF_TEXT)
    if manifest["tokenizer"]["vocab_size"] != vocab:
        given = manifest["tokenizer"]["vocab_size"]
        raise UserError(f"{where}: field tokenizer.vocab_size = {given}, {path} has {vocab} ids")
    if manifest["tokenizer"]["eos_id"] != eos:
        given = manifest["tokenizer"]["eos_id"]
        raise UserError(
            f"{where}: field tokenizer.eos_id = {given} is not {path}'s {END_OF_TEXT} id ({eos})"
        )
    if manifest["dtype"] != token_dtype(vocab).name:
        expected = token_dtype(vocab).name
        raise UserError(
            f"{where}: field dtype = {manifest['dtype']!r}, a {vocab}-id vocabulary is stored "
            f"as {expected!r}"
        )


def _check_fields(path: Path, manifest: dict[str, Any]) -> None:
    """Every field readers use is present, of its type, and names files inside the folder."""
    _field(path, manifest, ("dtype",), str)
    for key, kind in (("file", str), ("sha256", str), ("vocab_size", int), ("eos_id", int)):
        _field(path, manifest, ("tokenizer", key), kind)
    for name in _field(path, manifest, ("sources",), dict):
        _plain_name(path, f"sources.{name}", name)
        for split in ("train", "val"):
            shards = ("sources", name, "splits", split, "shards")
            for k, shard in enumerate(_field(path, manifest, shards, list)):
                keys = ["tokens_file", "docs_file", "tokens_sha256", "docs_sha256"]
                if isinstance(shard, dict) and "mask_file" in shard:  # conversations, captions
                    keys += ["mask_file", "mask_sha256"]
                if isinstance(shard, dict) and "images_file" in shard:  # image-text documents
                    keys += ["images_file", "images_sha256"]
                    if _field(path, manifest, (*shards, k, "image_size"), int) < 1:
                        raise UserError(f"{path}: field {_dotted((*shards, k, 'image_size'))} < 1")
                for key in keys:
                    value = _field(path, manifest, (*shards, k, key), str)
                    if key.endswith("_file"):
                        _plain_name(path, _dotted((*shards, k, key)), value)
                for key in ("tokens", "documents"):
                    if _field(path, manifest, (*shards, k, key), int) < 0:
                        raise UserError(f"{path}: field {_dotted((*shards, k, key))} is negative")


def read_manifest(data_dir: Path, old_versions: bool = False) -> dict[str, Any]:
    """The folder's manifest, verified: its checksum, its fields, and the tokenizer file it
    names (inside ``data_dir``, with the recorded sha256, eos_id, vocab_size and dtype).
    ``old_versions`` lets `moegpt prepare` read a v1 manifest (no checksum) to upgrade it."""
    path = data_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: not found; run `moegpt prepare --config ...` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}; {RERUN})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a moegpt shard manifest (format {FORMAT} v{VERSION})")
    version = manifest.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise UserError(f"{path}: format version {version!r} is not one this moegpt reads")
    if version < VERSION and not old_versions:
        raise UserError(
            f"{path}: format v{version} predates manifest checksums; {RERUN} to upgrade it "
            "(shards that are up to date are kept)"
        )
    if version == VERSION:
        if "checksum" not in manifest:
            raise UserError(f"{path}: field checksum is missing ({RERUN})")
        if manifest["checksum"] != manifest_checksum(manifest):
            raise UserError(f"{path}: checksum does not match its contents (edited?; {RERUN})")
    _check_fields(path, manifest)
    _check_tokenizer(data_dir, manifest)
    return manifest


def write_manifest(data_dir: Path, manifest: dict[str, Any]) -> None:
    body = {k: v for k, v in manifest.items() if k not in ("format", "version", "checksum")}
    manifest = {"format": FORMAT, "version": VERSION, **body}
    manifest["checksum"] = manifest_checksum(manifest)
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
    masks: list[np.ndarray] | None = None  # conversations, captions: 1 on the tokens trained on
    images: list[np.ndarray] | None = None  # image-text: (documents, size, size) per shard

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

    def mask(self, i: int) -> np.ndarray | None:
        """Document ``i``'s trained-on tokens (None: every token is)."""
        if self.masks is None:
            return None
        _, offsets = self.shards[self.doc_shard[i]]
        j = self.doc_local[i]
        return self.masks[self.doc_shard[i]][offsets[j] : offsets[j + 1]]

    def image(self, i: int) -> np.ndarray | None:
        """Document ``i``'s image (size, size) uint8, if the split has images."""
        if self.images is None:
            return None
        return self.images[self.doc_shard[i]][self.doc_local[i]]


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
    shards, lengths, shard_ids, local, masks, images = [], [], [], [], [], []
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
        if "mask_file" in shard:
            mask_path = data_dir / source / shard["mask_file"]
            _check_file(mask_path, shard["tokens"], shard["mask_sha256"], verify)
            masks.append(
                np.memmap(mask_path, dtype=np.uint8, mode="r")
                if shard["tokens"]
                else np.zeros(0, np.uint8)
            )
        if "images_file" in shard:
            images_path = data_dir / source / shard["images_file"]
            size, count = shard["image_size"], shard["documents"]
            _check_file(images_path, count * size * size, shard["images_sha256"], verify)
            shape = (count, size, size)
            images.append(
                np.memmap(images_path, dtype=np.uint8, mode="r", shape=shape)
                if count
                else np.zeros(shape, np.uint8)
            )
        lengths.append(np.diff(offsets))
        shard_ids.append(np.full(shard["documents"], k, dtype=np.int32))
        local.append(np.arange(shard["documents"], dtype=np.int64))
    return SplitTokens(
        name=source,
        shards=shards,
        doc_lengths=np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
        doc_shard=np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32),
        doc_local=np.concatenate(local) if local else np.zeros(0, np.int64),
        masks=masks if masks else None,
        images=images if images else None,
    )
