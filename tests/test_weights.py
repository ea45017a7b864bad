"""moegpt checkpoint folders: save/load round trip, the moegpt.load API, and bad folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moegpt
from moegpt.errors import UserError
from moegpt.weights import write_folder_atomically
from tests.conftest import small_config


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_gives_the_same_model(tmp_path: Path, tied: bool) -> None:
    model = moegpt.Transformer(small_config(tie_embeddings=tied, first_k_dense=1))
    moegpt.save_model(model, tmp_path / "ckpt")
    loaded = moegpt.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert not loaded.training
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    out = loaded(tokens)
    assert isinstance(out, moegpt.ModelOutput) and len(out.moe_stats) == 1


def test_load_can_cast(tmp_path: Path) -> None:
    moegpt.save_model(moegpt.Transformer(small_config()), tmp_path / "ckpt")
    loaded = moegpt.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_bad_folders_are_named_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint folder not found"):
        moegpt.load(tmp_path / "missing")
    model = moegpt.Transformer(small_config())
    moegpt.save_model(model, tmp_path / "ckpt")

    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["norm.weight"] = torch.ones(5)
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(
        UserError, match=r"tensor norm.weight has shape \(5,\), config.json implies"
    ):
        moegpt.load(tmp_path / "ckpt")

    del weights["norm.weight"]
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(UserError, match=r"does not match config.json \(missing \['norm.weight'\]"):
        moegpt.load(tmp_path / "ckpt")

    config_path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(config_path.read_text())
    meta["model"]["top_k"] = 9
    config_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="model.top_k: 9 exceeds model.n_experts"):
        moegpt.load(tmp_path / "ckpt")

    config_path.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="run `moegpt convert` first"):
        moegpt.load(tmp_path / "ckpt")
    config_path.write_text("{not json")
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        moegpt.load(tmp_path / "ckpt")


def test_a_failed_write_leaves_the_previous_folder_intact(tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    moegpt.save_model(moegpt.Transformer(small_config()), dst)
    before = sorted(p.name for p in dst.iterdir())

    def crash(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomically(dst, crash, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == before
    assert moegpt.load(dst).config == small_config()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("killed", ["before the first rename", "between the renames", "after"])
def test_a_write_killed_mid_swap_is_recovered_by_the_next(tmp_path: Path, killed: str) -> None:
    """A SIGKILL skips the swap's own clean-up: the next write to the folder puts the user's
    file back, restores what is missing and removes the leftovers before it writes."""
    new = moegpt.save_model(moegpt.Transformer(small_config(n_layers=3)), tmp_path / "new")
    root = tmp_path / "runs"
    dst = moegpt.save_model(moegpt.Transformer(small_config()), root / "model")
    (dst / "README.md").write_text("mine")
    partial, old = root / ".model.partial-abc", root / ".model.old-def"
    if killed == "after":  # the new model in place, the previous one not yet removed
        os.rename(dst, old)
        shutil.copytree(new, dst)
        os.rename(old / "README.md", dst / "README.md")
    else:  # the new model written, the user's file moved into it
        shutil.copytree(new, partial)
        os.rename(dst / "README.md", partial / "README.md")
        if killed == "between the renames":  # the previous model set aside, none in place
            os.rename(dst, old)
    moegpt.save_model(moegpt.Transformer(small_config(n_layers=4)), dst, overwrite=True)
    assert (dst / "README.md").read_text() == "mine"
    assert moegpt.load(dst).config.n_layers == 4
    assert sorted(p.name for p in root.iterdir()) == ["model"]
