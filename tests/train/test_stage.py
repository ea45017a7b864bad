"""Continuation stages (train.init_from, train.freeze): a run starts from its parent's exact
weights with a fresh optimizer, records the parent, resumes as any run does, refuses a model
the parent cannot fill, and leaves frozen parameters untouched."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moegpt.cli import main
from moegpt.errors import UserError
from moegpt.train.trainer import Trainer
from tests.conftest import make_config, restamp_weights

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
    child.prepare()
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
    first.prepare()
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
        quiet(wider, tmp_path / "run").prepare()
    shorter = make_config(tmp_path, prepared, "--model.max_seq_len=32", init_from=source)
    with pytest.raises(UserError, match=r"^model.max_seq_len: 32 is below the parent's 64"):
        quiet(shorter, tmp_path / "run").prepare()
    missing = make_config(tmp_path, prepared, init_from=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"^train.init_from: .*nowhere does not exist"):
        quiet(missing, tmp_path / "run").prepare()
    neither = make_config(tmp_path, prepared, init_from=str(tmp_path))
    with pytest.raises(UserError, match=r"neither a model folder .* nor a training run"):
        quiet(neither, tmp_path / "run").prepare()
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


def test_a_continuations_optimizer_starts_fresh(
    tmp_path: Path, prepared: Path, parent: Path
) -> None:
    """No optimizer state before the first step, and Adam's first step is step 1, as in a
    run from scratch (bias correction depends on it)."""
    config = make_config(tmp_path, prepared, *LONG, steps=2, init_from=str(parent / "export"))
    child = quiet(config, tmp_path / "child")
    child.prepare()
    optimizer = child.optimizers[0]
    assert not optimizer.state
    child.train_step(iter(child.loader))
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {1.0}


def test_a_resumed_continuation_does_not_need_its_parent(
    tmp_path: Path, prepared: Path, parent: Path
) -> None:
    """Its checkpoint holds everything: the parent may be gone, and the record stays."""
    source = tmp_path / "parent"
    shutil.copytree(parent / "export", source)
    config = make_config(tmp_path, prepared, *LONG, steps=2, init_from=str(source))
    quiet(config, tmp_path / "child").run(progress=False)
    record = (tmp_path / "child" / "parent.json").read_bytes()
    shutil.rmtree(source)
    again = quiet(config, tmp_path / "child")
    again.prepare()
    assert again.step == 2
    assert (tmp_path / "child" / "parent.json").read_bytes() == record


def test_changing_the_frozen_set_on_resume_is_refused(tmp_path: Path, prepared: Path) -> None:
    """Which parameters have optimizer state follows train.freeze: one line, not DCP's
    missing-key traceback (or, freezing more, optimizer state silently dropped)."""
    quiet(make_config(tmp_path, prepared, steps=2, freeze=["layers.0.*"]), tmp_path / "run").run(
        progress=False
    )
    for freeze in ([], ["layers.0.*", "layers.1.*"]):
        other = quiet(make_config(tmp_path, prepared, steps=2, freeze=freeze), tmp_path / "run")
        with pytest.raises(
            UserError,
            match=rf"^train.freeze: {re.escape(repr(freeze))}, but .*step-00000002 was trained "
            r"with \['layers.0.\*'\]; keep it to resume",
        ):
            other.prepare()


def test_a_parent_with_non_finite_weights_is_refused(
    tmp_path: Path, prepared: Path, parent: Path
) -> None:
    source = tmp_path / "parent"
    shutil.copytree(parent / "export", source)
    weights = load_file(source / "model.safetensors")
    weights["norm.weight"][0] = float("nan")
    save_file(weights, source / "model.safetensors")
    restamp_weights(source)
    config = make_config(tmp_path, prepared, *LONG, steps=2, init_from=str(source))
    with pytest.raises(UserError, match=r"^train.init_from: .* tensor norm.weight has NaN"):
        quiet(config, tmp_path / "run").prepare()
    assert not (tmp_path / "run").exists()


def test_a_run_without_a_parent_drops_an_earlier_attempts_record(
    tmp_path: Path, prepared: Path, parent: Path, capsys
) -> None:
    """A continuation that died before its first checkpoint left parent.json; the same
    folder then trained from scratch must not export that parent as its own."""
    run = tmp_path / "run"
    child = quiet(
        make_config(tmp_path, prepared, *LONG, steps=2, init_from=str(parent / "export")), run
    )
    child.prepare()
    assert (run / "parent.json").is_file()
    quiet(make_config(tmp_path, prepared, *LONG, steps=2), run).run(progress=False)
    assert not (run / "parent.json").exists()
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert "parent" not in json.loads((tmp_path / "out" / "config.json").read_text())
    (run / "parent.json").write_text("{oops")
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "out2")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"moegpt: error: {run / 'parent.json'}: not valid JSON")
