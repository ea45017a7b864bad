"""Reading ``torch.distributed.checkpoint`` folders without running code from them.

DCP stores its ``.metadata`` as a pickle and non-tensor values (an optimizer's param groups)
as ``torch.save`` blobs, and its stock reader loads both with full unpickling: a run folder
someone else made could run anything on resume or export. Here the metadata goes through an
unpickler that resolves only DCP's own metadata classes, torch dtypes, sizes and layouts and
plain paths, and non-tensor values load with ``torch.load(weights_only=True)``. Anything else
is refused with one line naming the file and the class it asked for.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from moegpt.errors import UserError

METADATA_FILE = ".metadata"

# The classes a DCP metadata pickle is made of (torch 2.11-2.13); each is a plain record
# whose construction runs no code of the file's choosing.
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name, e.g. "torch.strided"
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UserError(
            f"{self.path}: refuses to load {module}.{name}; checkpoint metadata may hold only "
            "DCP's own records (a crafted run folder? see the README's trust model)"
        )


class SafeFileSystemReader(FileSystemReader):
    """A ``FileSystemReader`` whose metadata is read by the restricted unpickler, and whose
    storage entries must name files inside the checkpoint folder."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self._get_metadata_path(rank))
        try:
            with path.open("rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except UserError:
            raise
        except (OSError, pickle.UnpicklingError, EOFError, TypeError, ValueError) as e:
            raise UserError(f"{path}: unreadable checkpoint metadata ({e})") from None
        if not isinstance(metadata, Metadata):
            raise UserError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or PurePath(name).name != name or name in ("", ".."):
                raise UserError(f"{path}: names a data file outside its folder ({name!r})")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with non-tensor values read by ``weights_only`` loading."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(
                f"{read_item.dest_index.fqn}: refuses to unpickle a checkpoint value ({first})"
            ) from None
        # The parent places the value (it knows the state dict's nesting) but unpickles it
        # fully: hand it a re-serialization of what the restricted load produced.
        checked = io.BytesIO()
        torch.save(obj, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def rank_errors(error: BaseException) -> list[BaseException]:
    """The exceptions behind ``error``: each rank's, where DCP gathered them into a
    ``CheckpointException`` (a BaseException carrying every failing rank's error)."""
    if isinstance(error, CheckpointException):
        return [exc for exc, _trace in error.failures.values()]
    return [error]


def load(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``dcp.load`` of ``state`` in place from the checkpoint folder ``path``, safely."""
    reader = SafeFileSystemReader(path)
    # Read the metadata once here: DCP would catch a refusal, try rank-local metadata files
    # instead and bury the reason in a traceback.
    reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except CheckpointException as e:
        refusal = next((x for x in rank_errors(e) if isinstance(x, UserError)), None)
        if refusal is not None:
            raise UserError(str(refusal)) from None
        raise
