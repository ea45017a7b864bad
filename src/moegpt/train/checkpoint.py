"""Training checkpoints that survive being killed at any moment.

A checkpoint is a folder ``step-00000100`` holding the model and optimizer as a
``torch.distributed.checkpoint`` (so later runs can load it at another parallel layout), the
trainer's own state as JSON, and ``manifest.json`` listing every file with its size and
sha256. It is written under a temporary name, the manifest is written last, everything is
fsynced, and one rename makes it visible: a kill during a save leaves the previous
checkpoints untouched, and a folder without a valid manifest is never resumed from. Damaged
checkpoints are moved to ``damaged/``; loading never unpickles anything (``safe_dcp``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException

from moegpt.errors import UserError
from moegpt.fileio import fsync_path, sha256_file, umask_mode
from moegpt.train import safe_dcp
from moegpt.train.safe_dcp import rank_errors

# One process without a process group is a supported DCP mode; its warning is noise here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")

MANIFEST = "manifest.json"
DAMAGED = "damaged"
DROPPED = "dropped"  # under damaged/: written off by a fresh start
OLD_SUFFIX = ".old"
LOW_DISK_BYTES = 1 << 20  # below this a failed write is put down to a full disk
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
    """Saves, finds and prunes the checkpoints of one run directory.

    Only checkpoints whose files match their manifest count: a damaged one is moved to
    ``damaged/`` with a line saying so, never resumed from, never counted toward ``keep``
    (so it can never push a good checkpoint out).
    """

    def __init__(self, folder: Path, keep: int = 0, log: Callable[[str], None] = print) -> None:
        self.folder = folder
        self.keep = keep
        self.log = log
        self._good: set[Path] = set()  # written or verified by this process
        self._bad: set[Path] = set()  # found damaged and could not be moved aside

    @property
    def damaged_folder(self) -> Path:
        return self.folder / DAMAGED

    # -- saving --------------------------------------------------------------------------
    def save(self, step: int, tensors: dict[str, Any], trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically; prune old ones past ``keep``.

        Under torchrun every rank writes its shards into one folder that rank 0 created, and
        rank 0 alone finishes it (trainer state, manifest, rename) once all have written. A
        failure (a full disk, say) removes the partial folder and raises one line on every
        rank naming the step, the cause and the newest checkpoint still intact.
        """
        final = self.folder / f"step-{step:08d}"
        tmp, problem = None, None
        if is_rank0():
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.folder))
                tmp.chmod(umask_mode(directory=True))  # mkdtemp's is private
            except OSError as e:
                problem = self._cause(e)
        tmp, problem = from_rank0((tmp, problem))
        if problem is None:
            try:
                dcp.save(tensors, checkpoint_id=str(tmp))
            except (Exception, CheckpointException) as e:  # DCP's is a BaseException
                problem = self._cause(e)
        problem = _first_problem(problem)
        if problem is None and is_rank0():
            try:
                self._finish(step, tmp, final, trainer_state)
            except Exception as e:
                problem = self._cause(e)
        problem = from_rank0(problem)
        if problem is not None:
            if is_rank0() and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(
                f"checkpoint of step {step} not saved: {problem}; {self._intact_description(final)}"
            )
        if is_rank0():
            self._prune()
        _barrier()
        return final

    def _finish(self, step: int, tmp: Path, final: Path, trainer_state: dict[str, Any]) -> None:
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
            old = final.with_name(f".{final.name}{OLD_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_path(self.folder)
        self._good.add(final)

    def _cause(self, error: BaseException) -> str:
        """What made a save fail, in a few words: the OS error behind it where there is one
        (torch's writer turns a full disk into "unexpected pos"), else the first line."""
        for exc in rank_errors(error):
            seen: BaseException | None = exc
            while seen is not None:
                if isinstance(seen, OSError) and seen.errno:
                    return os.strerror(seen.errno).lower()
                seen = seen.__cause__ or seen.__context__
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            free = None
        if free is not None and free < LOW_DISK_BYTES:
            return f"no space left on device ({free:,} bytes free in {self.folder})"
        first = rank_errors(error)[0]
        return f"{type(first).__name__}: {str(first).strip().splitlines()[0] if str(first) else ''}"

    def _intact_description(self, failed: Path) -> str:
        previous = [c for c in self._complete() if c.path != failed]
        if not previous:
            return "no earlier checkpoint exists"
        return f"the previous checkpoint {previous[0].path} is intact"

    def _prune(self) -> None:
        """Delete good checkpoints past the newest ``keep`` good ones; damaged ones are set
        aside as they are met and count for nothing."""
        if not self.keep:
            return
        kept = 0
        for checkpoint in self._complete():
            if kept >= self.keep:
                shutil.rmtree(checkpoint.path, ignore_errors=True)
            elif self._check(checkpoint):
                kept += 1

    # -- finding -------------------------------------------------------------------------
    def _complete(self) -> list[Checkpoint]:
        found = []
        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            match = STEP_DIR.match(path.name)
            if match and (path / MANIFEST).is_file():
                found.append(Checkpoint(int(match.group(1)), path))
        return sorted(found, key=lambda c: c.step, reverse=True)

    def clean_up(self) -> None:
        """Put the folder in order before a run: remove what a killed save left behind,
        restore a checkpoint a kill left under its set-aside name, and move step folders
        without a manifest to ``damaged/`` (each with a line)."""
        if is_rank0() and self.folder.is_dir():
            self._clean_up()
        _barrier()

    def _clean_up(self) -> None:
        for path in sorted(self.folder.iterdir()):
            name = path.name
            if name.startswith(".step-") and name.endswith(OLD_SUFFIX):
                original = self.folder / name[1 : -len(OLD_SUFFIX)]
                if original.exists():
                    shutil.rmtree(path, ignore_errors=True)
                else:  # killed between the two renames of a re-save: this is the checkpoint
                    path.rename(original)
                    self.log(f"restored {original} from its set-aside copy")
            elif name.startswith(".step-"):
                shutil.rmtree(path, ignore_errors=True)
                self.log(f"removed {path} (a save that did not finish)")
            elif STEP_DIR.match(name) and not (path / MANIFEST).is_file():
                self._set_aside(path, f"it has no {MANIFEST}")

    def _set_aside(self, path: Path, problem: str) -> None:
        self._good.discard(path)
        try:
            self.damaged_folder.mkdir(exist_ok=True)
            target = _free_name(self.damaged_folder, path.name)
            path.rename(target)
        except OSError as e:  # a read-only run folder, say: skip it in this process only
            self._bad.add(path)
            self.log(f"checkpoint {path} is damaged ({problem}); left in place ({e.strerror})")
            return
        self.log(f"checkpoint {path} is damaged ({problem}); moved it to {target}")

    def verify(self, checkpoint: Checkpoint) -> str | None:
        """None if every file matches the manifest, else what is wrong."""
        try:
            manifest = json.loads((checkpoint.path / MANIFEST).read_text())
            entries = manifest["files"]
            if TRAINER_STATE not in entries:
                return f"the manifest lists no {TRAINER_STATE}"
            for name, expected in entries.items():
                path = checkpoint.path / name
                if PurePath(name).is_absolute() or ".." in PurePath(name).parts:
                    return f"the manifest names {name}, outside the checkpoint"
                if not path.is_file():
                    return f"{name} is missing"
                if (
                    path.stat().st_size != expected["bytes"]
                    or sha256_file(path) != expected["sha256"]
                ):
                    return f"{name} does not match its checksum"
        # ValueError: JSONDecodeError, and UnicodeDecodeError for a byte that is not UTF-8
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"unreadable manifest ({type(e).__name__}: {e})"
        return None

    def _check(self, checkpoint: Checkpoint) -> bool:
        """Whether ``checkpoint`` is good; a damaged one is set aside."""
        if checkpoint.path in self._good:
            return True
        if checkpoint.path in self._bad:
            return False
        problem = self.verify(checkpoint)
        if problem is not None:
            self._set_aside(checkpoint.path, problem)
            return False
        self._good.add(checkpoint.path)
        return True

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint whose files all match their manifest, damaged newer ones
        moved aside on the way (rank 0 checks; every rank gets its answer)."""
        return from_rank0(self._latest() if is_rank0() else None)

    def _latest(self) -> Checkpoint | None:
        return next((c for c in self._complete() if self._check(c)), None)

    def set_aside(self) -> list[Path]:
        """The damaged checkpoints in ``damaged/`` that no fresh start has written off."""
        folder = self.damaged_folder
        found = folder.iterdir() if folder.is_dir() else ()
        return sorted(p for p in found if p.name.startswith("step-"))

    def write_off_damaged(self) -> None:
        """A fresh start was asked for: file the damaged checkpoints under ``damaged/dropped/``
        so that they no longer stop a later resume (rank 0 moves; all wait)."""
        if is_rank0() and (damaged := self.set_aside()):
            dropped = self.damaged_folder / DROPPED
            dropped.mkdir(exist_ok=True)
            for path in damaged:
                path.rename(_free_name(dropped, path.name))
            self.log(f"starting from step 0; {len(damaged)} damaged checkpoints kept in {dropped}")
        _barrier()

    @staticmethod
    def trainer_state(checkpoint: Checkpoint) -> dict[str, Any]:
        """The trainer state saved with ``checkpoint`` (step, data position, run settings)."""
        return json.loads((checkpoint.path / TRAINER_STATE).read_text())

    @staticmethod
    def load(checkpoint: Checkpoint, tensors: dict[str, Any]) -> None:
        """Load tensors in place (DCP, read without unpickling)."""
        safe_dcp.load(tensors, checkpoint.path)


def _free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/name.2``, ``.3``... if taken (one step can be damaged
    more than once across restarts)."""
    target, copy = folder / name, 1
    while target.exists():
        copy += 1
        target = folder / f"{name}.{copy}"
    return target


def _first_problem(problem: str | None) -> str | None:
    """The first rank's problem, on every rank (None only if no rank had one)."""
    if not dist.is_initialized():
        return problem
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


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
