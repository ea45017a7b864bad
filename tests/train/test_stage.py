"""Continuation stages (train.init_from, train.freeze): a run starts from its parent's exact
weights with a fresh optimizer, records the parent, resumes as any run does, refuses a model
the parent cannot fill, and leaves frozen parameters untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moegpt.cli import main
from moegpt.errors import UserError
from moegpt.train.trainer import Trainer
from tests.conftest import make_config

LONG = (
    "--model.max_seq_len=128",
    "--model.rope_scaling.type=yarn",
    "--model.rope_scaling.factor=2",
    "--model.rope_scaling.original_max_seq_len=64",
)


def quiet(config, run_dir: Path) -> Trainer:
    return Trainer(config, run_dir, log=lambda m: None)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, prepared: Path) -> Path:
    """A short pretraining run and its export."""
    root = tmp_path_factory.mktemp("parent")
    quiet(make_config(root, prepared, steps=3), root / "run").run(progress=False)
    assert main(["export", str(root / "run"), str(root / "export")]) == 0
    return root


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.parts.models[0].state_dict().items()}


@pytest.mark.parametrize("source", ["export", "run"])
def test_a_continuation_starts_from_its_parents_weights(
    tmp_path: Path, prepared: Path, parent: Path, source: str
) -> None:
    config = make_config(tmp_path, prepared, *LONG, steps=2, init_from=str(parent / source))
    child = quiet(config, tmp_path / "child")
    child.start_from_parent()
    want = load_file(parent / "export" / "model.safetensors")
    got = state(child)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_continuation_records_its_parent_and_exports_the_record(
    tmp_path: Path, prepared: Path, parent: Path
) -> None:
    source = parent / "export"
    config = make_config(tmp_path, prepared, *LONG, steps=2, init_from=str(source))
    quiet(config, tmp_path / "child").run(progress=False)
    record = json.loads((tmp_path / "child" / "parent.json").read_text())
    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    assert record == {"path": str(source.resolve()), "sha256": digest}
    assert main(["export", str(tmp_path / "child"), str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["parent"] == record
    assert meta["model"]["rope_scaling"]["type"] == "yarn"


def test_a_resumed_continuation_keeps_its_progress(
    tmp_path: Path, prepared: Path, parent: Path
) -> None:
    """Resume beats init_from: the run continues from its checkpoint, bit for bit as a run
    that never stopped, and does not start over from the parent."""
    args = dict(steps=6, init_from=str(parent / "export"))
    straight = quiet(make_config(tmp_path, prepared, *LONG, **args), tmp_path / "a")
    straight.run(progress=False)
    first = quiet(make_config(tmp_path, prepared, *LONG, **args), tmp_path / "b")
    first.start_from_parent()
    batches = iter(first.loader)
    for _ in range(3):
        first.train_step(batches)
    first.save()
    second = quiet(make_config(tmp_path, prepared, *LONG, **args), tmp_path / "b")
    second.run(progress=False)
    a, b = state(straight), state(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_the_parent_cannot_fill_is_refused_before_anything_is_written(
    tmp_path: Path, prepared: Path, parent: Path
) -> None:
    source = str(parent / "export")
    wider = make_config(tmp_path, prepared, "--model.n_layers=3", init_from=source)
    with pytest.raises(UserError, match=r"^model.n_layers: 3 differs from 2 in train.init_from"):
        quiet(wider, tmp_path / "run")
    shorter = make_config(tmp_path, prepared, "--model.max_seq_len=32", init_from=source)
    with pytest.raises(UserError, match=r"^model.max_seq_len: 32 is below the parent's 64"):
        quiet(shorter, tmp_path / "run")
    missing = make_config(tmp_path, prepared, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"^train.init_from: .*nowhere does not exist"):
        quiet(missing, tmp_path / "run")
    neither = make_config(tmp_path, prepared, init_from=str(tmp_path))
    with pytest.raises(UserError, match=r"neither a model folder .* nor a training run"):
        quiet(neither, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_frozen_parameters_stay_as_they_were(tmp_path: Path, prepared: Path) -> None:
    patterns = ["tok_embeddings.*", "layers.0.*"]
    config = make_config(tmp_path, prepared, steps=3, freeze=patterns)
    trainer = quiet(config, tmp_path / "run")
    before = state(trainer)
    trainer.run(progress=False)
    after = state(trainer)
    frozen = [k for k in before if k.startswith(("tok_embeddings.", "layers.0."))]
    trained = [k for k in before if k not in frozen]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if "norm" not in k)
    with pytest.raises(UserError, match=r"^train.freeze: 'layer.0.\*' matches no parameter"):
        quiet(make_config(tmp_path, prepared, freeze=["layer.0.*"]), tmp_path / "other")
