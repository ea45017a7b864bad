"""Shared test helpers: small model configs, deterministic CPU settings, and a small real
corpus (a few standard-library packages) prepared once per test session with recipes for
models that train in seconds on CPU."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton's kernels (where Triton is installed) run in its interpreter on CPU
# tensors, so their tests run too. Set before moegpt defines them: triton.jit reads it when it
# decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moegpt.config import Config, ModelConfig, VisionConfig, load_config
from moegpt.data.prepare import prepare


def small_config(**overrides: object) -> ModelConfig:
    """A model small enough for per-token reference loops: 2 layers, MQA, 4 experts top-2."""
    fields: dict[str, object] = dict(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        ffn_hidden=48,
        n_experts=4,
        top_k=2,
        max_seq_len=64,
        init_std=0.1,
    )
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def small_vision_config(**overrides: object) -> VisionConfig:
    """Vision small enough for reference loops: 8x8 grey images, 4 patches, 3 visual tokens
    each, cross-attention before every layer."""
    fields: dict[str, object] = dict(
        enabled=True,
        image_size=8,
        channels=1,
        patch_size=4,
        width=16,
        depth=1,
        heads=2,
        resampler_latents=3,
        xattn_every=1,
    )
    fields.update(overrides)
    return VisionConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


STDLIB = Path(sysconfig.get_paths()["stdlib"])


def recipe(root: Path, data_dir: Path, **train: object) -> Path:
    """A 2-layer, 4-expert MQA model on the prepared corpus; ``train`` overrides [train]."""
    settings = {
        "steps": 30,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "lr": 3e-3,
        "warmup_steps": 3,
        "log_every": 5,
        "eval_every": 0,
        "seed": 0,
        **train,
    }
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    path = root / "recipe.toml"
    path.write_text(
        "[model]\nvocab_size = 512\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 1\n"
        "ffn_hidden = 64\nn_experts = 4\ntop_k = 2\nmax_seq_len = 64\n"
        f'[data]\nseq_len = 32\ndata_dir = "{data_dir}"\nworkers = 1\n'
        f'[[data.sources]]\nname = "code"\nkind = "code"\npath = "{STDLIB / "json"}"\nepochs = 4\n'
        "val_fraction = 0.2\n"
        f'[[data.sources]]\nname = "text"\npath = "{STDLIB / "email"}"\nepochs = 2\n'
        "val_fraction = 0.1\n"
        f"[train]\n{lines}\n[checkpoint]\nevery = 3\nkeep = 2\n"
    )
    return path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    data_dir = root / "data"
    prepare(load_config(recipe(root, data_dir)), log=lambda m: None)
    return data_dir


def make_config(root: Path, data_dir: Path, *overrides: str, **train: object) -> Config:
    return load_config(recipe(root, data_dir, **train), list(overrides))


def restamp_weights(folder: Path) -> None:
    """Record the folder's (edited) weights file in its config.json, as export does: a test
    that plants a bad value reaches the check it is about, not the checksum's."""
    from moegpt.fileio import sha256_file

    weights, config = folder / "model.safetensors", folder / "config.json"
    meta = json.loads(config.read_text())
    meta["weights"] = {
        "file": weights.name,
        "bytes": weights.stat().st_size,
        "sha256": sha256_file(weights),
    }
    config.write_text(json.dumps(meta, indent=2))
