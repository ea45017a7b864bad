"""Training checkpoints that survive being killed at any moment.

A checkpoint is a folder ``step-00000100`` holding the model and optimizer as a
``torch.distributed.checkpoint`` (so later runs can load it at another parallel layout), the
trainer's own state as JSON, and ``manifest.json`` listing every file with its size and
sha256. It is written under a temporary name, the manifest is written last, everything is
fsynced, and one rename makes it visible: a kill during a save leaves the previous
checkpoints untouched, and a folder without a valid manifest is never resumed from.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from moegpt.fileio import fsync_path, sha256_file

# One process without a process group is a supported DCP mode; its warning is noise here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (file decisions are made once, on rank 0)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


class CheckpointManager:
    """Saves, finds and prunes the checkpoints of one run directory."""

    def __init__(self, folder: Path, keep: int = 0, log: Callable[[str], None] = print) -> None:
        self.folder = folder
        self.keep = keep
        self.log = log

    def save(self, step: int, tensors: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically; prune old ones past ``keep``.

        Under torchrun every rank writes its shards into one folder that rank 0 created, and
        rank 0 alone finishes it (trainer state, manifest, rename) once all have written.
        """
        final = self.folder / f"step-{step:08d}"
        tmp = None
        if is_rank0():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.folder))
        tmp = from_rank0(tmp)
        try:
            dcp.save(tensors, checkpoint_id=str(tmp))
        except BaseException:
            if is_rank0():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        _barrier()
        if is_rank0():
            self._finish(step, tmp, final, trainer_state)
        _barrier()
        return final

    def _finish(self, step: int, tmp: Path, final: Path, trainer_state: dict[str, Any]) -> None:
        try:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {
                "step": step,
                "files": {
                    str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                    for p in files
                },
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            for path in [*files, tmp / MANIFEST]:
                fsync_path(path)
            fsync_path(tmp)
            if final.exists():  # a checkpoint of this step from an earlier attempt: set it
                # aside first, so some complete copy exists at every moment
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            fsync_path(self.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()

    def _complete(self) -> list[Checkpoint]:
        found = []
        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            match = STEP_DIR.match(path.name)
            if match and (path / MANIFEST).is_file():
                found.append(Checkpoint(int(match.group(1)), path))
        return sorted(found, key=lambda c: c.step, reverse=True)

    def _prune(self) -> None:
        if self.keep:
            for old in self._complete()[self.keep :]:
                shutil.rmtree(old.path, ignore_errors=True)

    def remove_partial(self) -> None:
        """Delete folders a killed save left behind (never a complete checkpoint)."""
        if is_rank0() and self.folder.is_dir():
            self._remove_partial()
        _barrier()

    def _remove_partial(self) -> None:
        for path in self.folder.iterdir():
            if path.name.startswith(".step-") or (
                STEP_DIR.match(path.name) and not (path / MANIFEST).is_file()
            ):
                shutil.rmtree(path, ignore_errors=True)

    def verify(self, checkpoint: Checkpoint) -> str | None:
        """None if every file matches the manifest, else what is wrong."""
        try:
            manifest = json.loads((checkpoint.path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"unreadable manifest ({e})"
        for name, expected in manifest.get("files", {}).items():
            path = checkpoint.path / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
                return f"{name} does not match its checksum"
        return None

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint whose files all match their manifest; corrupt ones are
        reported and skipped (rank 0 checks; every rank gets its answer)."""
        return from_rank0(self._latest() if is_rank0() else None)

    def _latest(self) -> Checkpoint | None:
        for checkpoint in self._complete():
            problem = self.verify(checkpoint)
            if problem is None:
                return checkpoint
            self.log(f"checkpoint {checkpoint.path} is damaged ({problem}); trying an older one")
        return None

    @staticmethod
    def load(checkpoint: Checkpoint, tensors: dict[str, Any]) -> dict[str, Any]:
        """Load tensors in place (DCP) and return the trainer state."""
        dcp.load(tensors, checkpoint_id=str(checkpoint.path))
        return json.loads((checkpoint.path / TRAINER_STATE).read_text())


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU generator and this process's GPU generator (no other GPU is touched)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
