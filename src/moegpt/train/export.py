"""`moegpt export RUN_DIR OUT_DIR`: a serving checkpoint from a run's newest checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from moegpt.chat import TOKENIZER_CONFIG, chatml_tokenizer_config
from moegpt.config import load_config
from moegpt.console import stderr
from moegpt.data.shards import read_manifest, tokenizer_file
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.model.vision import VisionLanguageModel, model_for
from moegpt.train import safe_dcp
from moegpt.train.checkpoint import CheckpointManager
from moegpt.train.stage import read_parent_record
from moegpt.train.trainer import RUN_CONFIG
from moegpt.weights import save_model


def load_run_model(run_dir: Path) -> tuple[Transformer | VisionLanguageModel, int]:
    """The model of a run's newest complete checkpoint (with eyes for a vision run), on CPU,
    and its step."""
    config_path = run_dir / RUN_CONFIG
    if not config_path.is_file():
        raise UserError(f"{run_dir}: not a training run directory (no {RUN_CONFIG})")
    config = load_config(config_path)
    checkpoint = CheckpointManager(
        run_dir / "checkpoints", log=lambda m: stderr.print(m, highlight=False)
    ).latest()
    if checkpoint is None:
        raise UserError(f"{run_dir}: no complete checkpoint to export")
    model = model_for(config.model, config.vision)
    state = {"model": model.state_dict()}
    safe_dcp.load(state, checkpoint.path)  # in place; only the model is read
    model.load_state_dict(state["model"])
    return model.eval(), checkpoint.step


def export(run_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Write ``model.safetensors``, ``config.json``, ``tokenizer.json`` and
    ``tokenizer_config.json`` (its chat template) to ``out_dir``."""
    model, step = load_run_model(run_dir)
    config = load_config(run_dir / RUN_CONFIG)
    data_dir = Path(config.data.data_dir)
    tokenizer = tokenizer_file(data_dir, read_manifest(data_dir))  # inside data_dir
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer}: the run's tokenizer is missing")
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        template = data_dir / TOKENIZER_CONFIG
        if not template.is_file():  # prepared before templates travelled with tokenizers
            template = Path(tmp) / TOKENIZER_CONFIG
            template.write_text(chatml_tokenizer_config())
        path = save_model(
            model,
            out_dir,
            overwrite,
            extra_files={"tokenizer.json": tokenizer, TOKENIZER_CONFIG: template},
            parent=read_parent_record(run_dir),
        )
    stderr.print(f"exported step {step} of {run_dir} to {path}", highlight=False)
    return path
