"""Continuation stages: a run that starts from another model's weights (``train.init_from``),
with its own optimizer, schedule and data, and parameters it leaves untrained
(``train.freeze``).

GPT-4's 32k model is its 8k model trained further at the longer context; instruction tuning
and vision start from a pretrained model the same way. The parent is an exported model folder
or a training run directory (its newest complete checkpoint). The child may change only what
leaves the weights' meaning intact: the context (``max_seq_len``, ``rope_scaling``) and the
router's training-time losses. The run records its parent (path, sha256 of its weights) in
``parent.json`` beside its checkpoints, and its export carries the record on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from moegpt.config import ModelConfig, VisionConfig
from moegpt.errors import UserError
from moegpt.fileio import sha256_file, write_atomically
from moegpt.model.vision import VisionLanguageModel, language_model
from moegpt.weights import WEIGHTS_FILE, check_folder, is_model_folder, read_json, weight_problem

PARENT_FILE = "parent.json"
# [model] fields a continuation may change: the context, and losses that only shape training.
CHANGEABLE = frozenset(
    {"max_seq_len", "rope_scaling", "aux_loss_coef", "z_loss_coef", "capacity_factor"}
)


@dataclass
class Parent:
    """The weights a continuation starts from."""

    path: Path
    config: ModelConfig
    state: dict[str, torch.Tensor]  # full tensors, on CPU
    sha256: str  # of the model folder's weights file, or of a run checkpoint's tensors
    vision: VisionConfig  # disabled for a language model
    step: int | None = None  # the run checkpoint's step

    def record(self) -> dict[str, Any]:
        """What the child keeps of its parent."""
        record: dict[str, Any] = {"path": str(self.path.resolve()), "sha256": self.sha256}
        if self.step is not None:
            record["step"] = self.step
        return record


def load_parent(source: str | Path) -> Parent:
    """The model folder or run directory at ``source``; a one-line error naming
    ``train.init_from`` for anything else."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"train.init_from: {path} does not exist")
    if is_model_folder(path):
        checked = check_folder(path)
        weights = path / WEIGHTS_FILE
        state = load_file(weights)
        for name, tensor in state.items():  # a NaN would train on as NaN losses
            if (problem := weight_problem(tensor, tensor.dtype)[1]) is not None:
                raise UserError(f"train.init_from: {weights}: tensor {name} has {problem}")
        return Parent(path, checked.config, state, sha256_file(weights), checked.vision)
    # A run directory: its newest complete checkpoint (imported here: export imports the
    # trainer, which imports this module).
    from moegpt.train.export import load_run_model
    from moegpt.train.trainer import RUN_CONFIG

    if not (path / RUN_CONFIG).is_file():
        raise UserError(
            f"train.init_from: {path} is neither a model folder (config.json, "
            f"{WEIGHTS_FILE}) nor a training run directory ({RUN_CONFIG})"
        )
    model, step = load_run_model(path)
    state = {name: t.detach() for name, t in model.state_dict().items()}
    vision = model.config if isinstance(model, VisionLanguageModel) else VisionConfig()
    lm = language_model(model).config
    return Parent(path, lm, state, _tensors_sha256(state), vision, step)


def check_compatible(parent: Parent, child: ModelConfig, vision: VisionConfig) -> None:
    """Refuse a child model that the parent's weights do not describe, naming the field: its
    language model may change only what a continuation may, and a vision child of a vision
    parent has the parent's vision parts."""
    if parent.vision.enabled and vision.enabled:
        for f in dataclasses.fields(VisionConfig):
            mine, theirs = getattr(vision, f.name), getattr(parent.vision, f.name)
            both_clip = vision.objective == parent.vision.objective == "clip"
            if mine != theirs and (f.name not in VISION_CHANGEABLE or both_clip):
                raise UserError(
                    f"vision.{f.name}: {mine!r} differs from {theirs!r} in train.init_from "
                    f"({parent.path})"
                )
    for f in dataclasses.fields(ModelConfig):
        mine, theirs = getattr(child, f.name), getattr(parent.config, f.name)
        if f.name not in CHANGEABLE and mine != theirs:
            raise UserError(
                f"model.{f.name}: {mine!r} differs from {theirs!r} in train.init_from "
                f"({parent.path}); a continuation may change only "
                f"{', '.join(sorted(CHANGEABLE))}"
            )
    if child.max_seq_len < parent.config.max_seq_len:
        raise UserError(
            f"model.max_seq_len: {child.max_seq_len} is below the parent's "
            f"{parent.config.max_seq_len} (train.init_from {parent.path})"
        )


def write_parent_record(run_dir: Path, parent: Parent) -> None:
    write_atomically(run_dir / PARENT_FILE, (json.dumps(parent.record(), indent=2) + "\n").encode())


def read_parent_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / PARENT_FILE
    return read_json(path) if path.is_file() else None


def parent_state(
    parent: Parent, names: list[str], image_token_id: int | None = None
) -> dict[str, torch.Tensor]:
    """The parent's tensors for a child's parameter ``names``: the same names, or, for a
    vision model started from a text model, its language model's (``lm.`` + the parent's
    name), and the ``<|image|>`` embedding from the parent's row for ``image_token_id``; a
    text model started from a vision model takes the vision model's language model. The
    other vision parts a text parent lacks keep their initialisation; a language-model weight
    the parent lacks is an error."""
    state = {}
    rows = parent.state.get("tok_embeddings.weight")
    for name in names:
        if name in parent.state:
            state[name] = parent.state[name]
        elif name.startswith("lm.") and name[3:] in parent.state:
            state[name] = parent.state[name[3:]]
        elif f"lm.{name}" in parent.state:
            state[name] = parent.state[f"lm.{name}"]
        elif name == "image_embedding" and rows is not None and image_token_id is not None:
            state[name] = rows[image_token_id].clone()
        elif name.split(".")[0] not in VISION_PARTS:
            raise UserError(f"train.init_from: {parent.path} has no weights for {name}")
    return state


VISION_PARTS = ("encoder", "resampler", "xattn", "image_embedding", "clip")
# A vision stage may follow one with another objective (the Flamingo stage after the CLIP
# stage); the contrastive heads' width matters only to the heads, which the other drops (a
# CLIP stage after a CLIP stage keeps them, so there it may not change).
VISION_CHANGEABLE = ("objective", "clip_dim")


def _tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
