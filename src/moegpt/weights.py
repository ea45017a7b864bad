"""moegpt checkpoint folders: ``config.json`` + ``model.safetensors`` (no pickles anywhere).

Folders are written next to their destination and renamed into place, so an interrupted or
failed save never leaves a half-written checkpoint where a good one was expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moegpt.config import ModelConfig, section_from_dict
from moegpt.errors import ConfigError, UserError
from moegpt.fileio import fsync_path
from moegpt.model import Transformer

FORMAT = "moegpt"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def write_folder_atomically(
    dst: str | Path, write: Callable[[Path], None], overwrite: bool = False
) -> Path:
    """Run ``write(tmp_dir)`` beside ``dst`` and move the result into place only if it succeeds.

    Files are fsynced before the rename, so a crash leaves either the old folder or the new
    one, never a half-written checkpoint under the destination's name.
    """
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise UserError(f"{dst}: already exists and is not empty (pass --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        write(tmp)
        _make_durable(tmp)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
        fsync_path(dst.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _make_durable(folder: Path) -> None:
    """fsync every file and give the folder the permissions a plain mkdir would have had
    (mkdtemp creates it private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        fsync_path(path)
    fsync_path(folder)


def checkpoint_meta(config: ModelConfig) -> dict[str, Any]:
    """The contents of a moegpt folder's config.json."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": dataclasses.asdict(config)}


def save_model(
    model: Transformer,
    path: str | Path,
    overwrite: bool = False,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Save ``model`` as a moegpt checkpoint folder, with ``extra_files`` (name -> source
    file, e.g. the tokenizer) copied in by the same atomic write."""
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    meta = checkpoint_meta(model.config)

    def write(folder: Path) -> None:
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, folder / name)

    return write_folder_atomically(path, write, overwrite)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line error naming the file."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """The model config of a moegpt checkpoint folder."""
    config_path = Path(path) / CONFIG_FILE
    meta = read_json(config_path)
    if meta.get("format") != FORMAT:
        hint = " (Hugging Face? run `moegpt convert` first)" if "model_type" in meta else ""
        raise UserError(f"{config_path}: not a moegpt checkpoint config{hint}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        version = meta["format_version"]
        raise UserError(f"{config_path}: format_version {version} is newer than this moegpt reads")
    try:
        return section_from_dict(ModelConfig, meta.get("model", {}))
    except ConfigError as e:
        raise UserError(f"{config_path}: {e}") from None


def load(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Load a moegpt checkpoint folder as a model in eval mode, its config at ``model.config``."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: checkpoint folder not found")
    config = load_model_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"{weights_path}: file not found")
    state = {}
    with safe_open(weights_path, framework="pt", device=str(device)) as f:
        names = set(f.keys())
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            raise UserError(
                f"{weights_path}: does not match config.json "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
            )
        for name in expected:
            tensor = f.get_tensor(name)
            if tuple(tensor.shape) != expected[name]:
                raise UserError(
                    f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {expected[name]}"
                )
            state[name] = tensor.to(dtype) if dtype is not None else tensor
    model.load_state_dict(state, assign=True)
    return model.eval()
