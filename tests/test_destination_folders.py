"""Files stay in their place: --force replaces only a model folder's own files (and refuses a
folder that is not a model folder), and export copies only a tokenizer inside data_dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import moegpt
import moegpt.weights
from moegpt.cli import main
from moegpt.data.shards import write_manifest
from moegpt.errors import UserError
from moegpt.train.trainer import Trainer
from moegpt.weights import write_folder_atomically
from tests.conftest import make_config, small_config


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _unrelated(folder: Path) -> None:
    (folder / "notes.txt").write_text("precious")
    (folder / "eval").mkdir()
    (folder / "eval" / "results.json").write_text("{}")


def test_force_refuses_a_folder_that_is_not_a_model_folder(tmp_path: Path, capsys) -> None:
    src = moegpt.save_model(moegpt.Transformer(small_config()), tmp_path / "src")
    dst = tmp_path / "home"
    dst.mkdir()
    _unrelated(dst)
    (dst / "tokenizer.json").write_text("mine, though the name is a model file's")
    before = _tree(dst)
    assert main(["convert", str(src), str(dst), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"{dst}: not empty and not a model folder" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="not a model folder"):
        moegpt.save_model(moegpt.Transformer(small_config()), dst, overwrite=True)  # export's
    assert _tree(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "src"]


def test_force_replaces_only_the_model_files(tmp_path: Path) -> None:
    dst = moegpt.save_model(
        moegpt.Transformer(small_config(n_layers=3)),
        tmp_path / "m",
        extra_files={"tokenizer.json": Path(__file__)},
    )
    _unrelated(dst)
    (dst / "model-00001-of-00002.safetensors").write_bytes(b"a stale shard")
    new = moegpt.Transformer(small_config())
    moegpt.save_model(new, dst, overwrite=True)
    assert moegpt.load(dst).config == small_config()
    assert (dst / "notes.txt").read_text() == "precious"
    assert (dst / "eval" / "results.json").read_text() == "{}"
    # the previous model's own files that the new one does not have are gone
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json",
        "eval",
        "model.safetensors",
        "notes.txt",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_convert_force_into_a_hugging_face_folder_keeps_its_other_files(tmp_path: Path) -> None:
    src = moegpt.save_model(moegpt.Transformer(small_config(n_experts=0)), tmp_path / "src")
    hf = tmp_path / "hf"
    assert main(["convert", str(src), str(hf)]) == 0
    (hf / "README.md").write_text("model card")
    assert main(["convert", str(src), str(hf), "--force"]) == 0
    assert (hf / "README.md").read_text() == "model card"
    assert json.loads((hf / "config.json").read_text())["model_type"] == "llama"


def test_a_failed_swap_puts_everything_back(tmp_path: Path, monkeypatch) -> None:
    dst = moegpt.save_model(moegpt.Transformer(small_config()), tmp_path / "m")
    _unrelated(dst)
    before = _tree(dst)
    real = os.rename

    def fails_into_place(src, target):
        if Path(src).name.startswith(".m.partial-") and Path(target) == dst:
            raise OSError("disk went away")
        return real(src, target)

    monkeypatch.setattr(moegpt.weights.os, "rename", fails_into_place)
    with pytest.raises(OSError, match="disk went away"):
        moegpt.save_model(moegpt.Transformer(small_config(n_layers=3)), dst, overwrite=True)
    assert _tree(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_failed_write_keeps_the_unrelated_files(tmp_path: Path) -> None:
    dst = moegpt.save_model(moegpt.Transformer(small_config()), tmp_path / "m")
    _unrelated(dst)
    before = _tree(dst)

    def crash(folder: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_folder_atomically(dst, crash, overwrite=True)
    assert _tree(dst) == before


def test_a_symlinked_destination_is_refused(tmp_path: Path) -> None:
    real = moegpt.save_model(moegpt.Transformer(small_config()), tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UserError, match="link: is a symlink"):
        moegpt.save_model(moegpt.Transformer(small_config()), tmp_path / "link", overwrite=True)


def test_export_copies_no_tokenizer_from_outside_data_dir(tmp_path: Path, prepared: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(prepared, data_dir)
    config = make_config(tmp_path, data_dir, steps=3)
    Trainer(config, tmp_path / "run", log=lambda m: None).run(progress=False)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["tokenizer"]["file"] = "/etc/hostname"
    write_manifest(data_dir, manifest)  # even a consistently sealed manifest
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
