"""Checkpoints a stranger made run no code; damaged checkpoints never eat progress; a full disk
during a save is one line; a resumed run's metrics have one row per step."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import moegpt
from moegpt.cli import main
from moegpt.fileio import sha256_file
from moegpt.train.checkpoint import MANIFEST, CheckpointManager
from moegpt.train.trainer import Trainer
from tests.conftest import make_config

MARKER_NAME = "pwned"


class WritesAFile:
    """A pickle payload: unpickling it writes the marker file (as an attacker's would run
    anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


def reseal(checkpoint: Path) -> None:
    """Rewrite the manifest to match the files, as whoever crafted the folder would."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        entry["bytes"] = (checkpoint / name).stat().st_size
        entry["sha256"] = sha256_file(checkpoint / name)
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def small_checkpoint(folder: Path, **extra: object) -> tuple[CheckpointManager, Path]:
    manager = CheckpointManager(folder, log=lambda m: None)
    path = manager.save(1, {"w": torch.arange(4.0), **extra}, {"step": 1})
    return manager, path


def plant_in_metadata(checkpoint: Path, payload: object) -> None:
    metadata_file = checkpoint / ".metadata"
    with metadata_file.open("rb") as f:
        metadata = pickle.load(f)  # the test's own file, written just now
    metadata.planner_data = payload
    metadata_file.write_bytes(pickle.dumps(metadata))
    reseal(checkpoint)


def test_crafted_metadata_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / MARKER_NAME
    manager, path = small_checkpoint(tmp_path / "ckpt")
    plant_in_metadata(path, WritesAFile(marker))

    # The threat is real: torch's own reader runs the payload.
    dcp.load({"w": torch.zeros(4)}, checkpoint_id=str(path))
    assert marker.exists()
    marker.unlink()

    checkpoint = manager.latest()
    assert checkpoint is not None  # the manifest matches: only the unpickler stands guard
    with pytest.raises(moegpt.errors.UserError, match=r"refuses to load builtins\.exec"):
        manager.load(checkpoint, {"w": torch.zeros(4)})
    assert not marker.exists()


def test_crafted_non_tensor_value_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / MARKER_NAME
    manager, _ = small_checkpoint(tmp_path / "ckpt", extra=WritesAFile(marker))
    assert not marker.exists()
    with pytest.raises(moegpt.errors.UserError, match="extra: refuses to unpickle"):
        manager.load(manager.latest(), {"w": torch.zeros(4), "extra": None})
    assert not marker.exists()


def test_plain_values_and_layouts_still_load(tmp_path: Path) -> None:
    groups = [{"lr": 1e-3, "betas": (0.9, 0.95), "params": ["a.weight"], "fused": None}]
    manager, _ = small_checkpoint(tmp_path / "ckpt", groups=groups, h=torch.ones(2, 3).half())
    blank = [{"lr": 0.0, "betas": (0.0, 0.0), "params": [""], "fused": False}]
    state = {"w": torch.zeros(4), "groups": blank, "h": torch.zeros(2, 3).half()}
    manager.load(manager.latest(), state)
    assert manager.trainer_state(manager.latest()) == {"step": 1}
    assert state["groups"] == groups and torch.equal(state["h"], torch.ones(2, 3).half())


def test_metadata_naming_a_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    manager, path = small_checkpoint(tmp_path / "ckpt")
    with (path / ".metadata").open("rb") as f:
        metadata = pickle.load(f)
    for info in metadata.storage_data.values():
        info.relative_path = "../../secret"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(path)
    with pytest.raises(moegpt.errors.UserError, match="outside its folder"):
        manager.load(manager.latest(), {"w": torch.zeros(4)})


def test_export_of_a_crafted_run_exits_2_and_runs_nothing(
    tmp_path: Path, prepared: Path, capsys
) -> None:
    Trainer(make_config(tmp_path, prepared, steps=3), tmp_path / "run", log=lambda m: None).run(
        progress=False
    )
    marker = tmp_path / MARKER_NAME
    plant_in_metadata(tmp_path / "run" / "checkpoints" / "step-00000003", WritesAFile(marker))
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert "refuses to load builtins.exec" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def damage(checkpoint: Path) -> None:
    shard = next(checkpoint.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")


def test_every_checkpoint_damaged_refuses_to_start_over(tmp_path: Path, prepared: Path) -> None:
    config = make_config(tmp_path, prepared, steps=9)
    run = tmp_path / "run"
    Trainer(config, run, log=lambda m: None).run(progress=False)
    folder = run / "checkpoints"
    for checkpoint in folder.glob("step-*"):
        damage(checkpoint)
    messages: list[str] = []
    for _ in range(2):  # and again once they are set aside: nothing silently starts at step 0
        with pytest.raises(moegpt.errors.UserError, match="no usable checkpoint.*--resume never"):
            Trainer(config, run, log=messages.append).run(progress=False)
    assert sorted(p.name for p in (folder / "damaged").iterdir()) == [
        "step-00000006",
        "step-00000009",
    ]
    assert sum("is damaged" in m for m in messages) == 2

    Trainer(config, run, log=messages.append).run(resume=False, progress=False)
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-00000006", "step-00000009"]
    assert len(list((folder / "damaged" / "dropped").iterdir())) == 2
    assert Trainer(config, run, log=messages.append).resume()  # the new run's resume works


def test_damaged_checkpoints_never_count_toward_keep(tmp_path: Path) -> None:
    messages: list[str] = []
    manager = CheckpointManager(tmp_path, keep=2, log=messages.append)
    for step in (1, 2):
        manager.save(step, {"x": torch.tensor([step])}, {"step": step})
    (tmp_path / "step-00000002" / "trainer.json").write_text('{"step": 7}')  # bit rot
    fresh = CheckpointManager(tmp_path, keep=2, log=messages.append)  # a restarted process
    fresh.save(3, {"x": torch.tensor([3])}, {"step": 3})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000001", "step-00000003"]
    assert [p.name for p in (tmp_path / "damaged").iterdir()] == ["step-00000002"]
    assert any("step-00000002 is damaged (trainer.json does not match" in m for m in messages)


def test_a_step_folder_without_manifest_is_reported_and_kept(tmp_path: Path) -> None:
    messages: list[str] = []
    manager = CheckpointManager(tmp_path, log=messages.append)
    manager.save(1, {"x": torch.tensor([1])}, {"step": 1})
    (tmp_path / "step-00000001" / MANIFEST).unlink()
    (tmp_path / ".step-00000002.tmp-abc").mkdir()  # a killed save's leftovers
    manager.clean_up()
    assert (tmp_path / "damaged" / "step-00000001" / "trainer.json").is_file()
    assert any("step-00000001 is damaged (it has no manifest.json)" in m for m in messages)
    assert any(".step-00000002.tmp-abc" in m and "did not finish" in m for m in messages)


def test_a_kill_between_the_renames_of_a_resave_loses_nothing(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, log=lambda m: None)
    manager.save(4, {"x": torch.tensor([4])}, {"step": 4})
    (tmp_path / "step-00000004").rename(tmp_path / ".step-00000004.old")
    manager.clean_up()
    assert manager.latest().path == tmp_path / "step-00000004"


def no_space(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_save_is_one_line_and_keeps_the_previous(
    tmp_path: Path, prepared: Path, monkeypatch
) -> None:
    config = make_config(tmp_path, prepared, steps=6)
    trainer = Trainer(config, tmp_path / "run", log=lambda m: None)
    save = trainer.checkpoints.save

    def save_then_fill_the_disk(*args: object) -> Path:
        path = save(*args)
        monkeypatch.setattr(os, "fsync", no_space)  # DCP fsyncs each file it writes
        return path

    monkeypatch.setattr(trainer.checkpoints, "save", save_then_fill_the_disk)
    with pytest.raises(moegpt.errors.UserError) as failure:
        trainer.run(progress=False)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("checkpoint of step 6 not saved: no space left on device; ")
    assert message.endswith("step-00000003 is intact")
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == ["step-00000003"]  # no partial folder
    monkeypatch.undo()
    again = Trainer(config, tmp_path / "run", log=lambda m: None)
    assert again.resume() and again.step == 3


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 256 KiB tmpfs, where mounting is allowed (root on Linux); else the test is skipped."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk_names_its_cause(small_tmpfs: Path) -> None:
    manager = CheckpointManager(small_tmpfs / "checkpoints", log=lambda m: None)
    manager.save(1, {"w": torch.zeros(20_000)}, {"step": 1})  # 80 KB
    with pytest.raises(moegpt.errors.UserError) as failure:
        manager.save(2, {"w": torch.zeros(60_000)}, {"step": 2})  # 240 KB: does not fit
    assert "checkpoint of step 2 not saved: no space left on device" in str(failure.value)
    assert "step-00000001 is intact" in str(failure.value)
    assert [c.step for c in [manager.latest()]] == [1]
    assert sorted(p.name for p in (small_tmpfs / "checkpoints").iterdir()) == ["step-00000001"]


def test_resumed_run_has_one_metrics_row_per_step(tmp_path: Path, prepared: Path) -> None:
    config = make_config(tmp_path, prepared, steps=9)
    run = tmp_path / "run"
    Trainer(config, run, log=lambda m: None).run(progress=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a line cut by a kill
    # As if killed after step 9 but before its checkpoint landed: steps 7-9 run again.
    shutil.rmtree(run / "checkpoints" / "step-00000009")
    Trainer(config, run, log=lambda m: None).run(progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == list(range(1, 10))


def test_a_manifest_that_is_not_utf8_is_set_aside(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, log=lambda m: None)
    for step in (1, 2):
        manager.save(step, {"x": torch.tensor([step])}, {"step": step})
    manifest = tmp_path / "step-00000002" / MANIFEST
    data = bytearray(manifest.read_bytes())
    data[5] = 0xFF
    manifest.write_bytes(bytes(data))
    found = CheckpointManager(tmp_path, log=lambda m: None).latest()
    assert found is not None and found.path.name == "step-00000001"
    assert (tmp_path / "damaged" / "step-00000002").is_dir()


def test_a_damaged_checkpoint_that_cannot_be_moved_is_skipped(tmp_path: Path, monkeypatch) -> None:
    """A read-only run folder: the damaged newest checkpoint stays where it is, and the
    previous one is used."""
    manager = CheckpointManager(tmp_path, log=lambda m: None)
    for step in (1, 2):
        manager.save(step, {"x": torch.tensor([step])}, {"step": step})
    (tmp_path / "step-00000002" / "trainer.json").write_text('{"step": 7}')

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "rename", read_only)
    monkeypatch.setattr(Path, "mkdir", read_only)
    messages: list[str] = []
    fresh = CheckpointManager(tmp_path, log=messages.append)
    found = fresh.latest()
    assert found is not None and found.path.name == "step-00000001"
    assert fresh.latest() == found  # asked again: skipped, not re-verified into an error
    assert any("left in place (Read-only file system)" in m for m in messages)
    assert (tmp_path / "step-00000002").is_dir()


def test_a_child_killed_by_sigterm_counts_as_a_stop() -> None:
    import signal
    import sys

    from moegpt.children import run_child
    from moegpt.train.supervisor import FINAL

    kill = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    status = run_child([sys.executable, "-c", kill])
    assert status == 128 + signal.SIGTERM and status in FINAL
    assert run_child([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_config_json_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    from moegpt.errors import UserError
    from moegpt.weights import read_json

    (tmp_path / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UserError, match="config.json: not valid JSON"):
        read_json(tmp_path / "config.json")


def test_an_atomic_write_flushes_its_folder(tmp_path: Path, monkeypatch) -> None:
    from moegpt import fileio

    flushed: list[Path] = []
    monkeypatch.setattr(fileio, "fsync_path", flushed.append)
    fileio.write_atomically(tmp_path / "a.json", b"{}")
    assert flushed == [tmp_path] and (tmp_path / "a.json").read_bytes() == b"{}"


def test_the_kill_harness_sees_the_steps_a_resumed_attempt_redoes(tmp_path: Path) -> None:
    """A resumed attempt cuts metrics.jsonl back and logs the steps after its checkpoint
    again, below the old file's end: the harness still sees them (it watched the old file's
    size before, and so killed later than it meant to, or never)."""
    from moegpt.harness.faults import _last_step_of_attempt, _metrics_inode
    from moegpt.train.metrics import MetricsWriter

    first = MetricsWriter(tmp_path)
    for step in range(1, 11):
        first.write("train", step, {"loss": 1.0})
    first.close()
    launched = _metrics_inode(tmp_path)
    assert _last_step_of_attempt(tmp_path, launched) == 0  # the old attempt's rows only
    again = MetricsWriter(tmp_path, start_step=5)  # the relaunch resumes at step 5
    assert _last_step_of_attempt(tmp_path, launched) == 5
    for step in (6, 7):
        again.write("train", step, {"loss": 1.0})
    again.close()
    assert _last_step_of_attempt(tmp_path, launched) == 7
