"""The trainer: loss falls, checkpoints are atomic and verified, resume is bit-exact even after
SIGKILL at random moments, export/report work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moegpt
from moegpt.cli import main
from moegpt.harness.faults import launch_training, train_with_kills
from moegpt.train.checkpoint import CheckpointManager
from moegpt.train.export import load_run_model
from moegpt.train.metrics import data_stream, read_metrics
from moegpt.train.supervisor import supervise
from moegpt.train.trainer import Trainer
from tests.conftest import make_config, recipe, small_config


def test_loss_falls(tmp_path: Path, prepared: Path) -> None:
    config = make_config(tmp_path, prepared, steps=80, global_batch_size=8, log_every=100)
    trainer = Trainer(config, tmp_path / "run", log=lambda m: None)
    trainer.run(progress=False)
    rows = [e for e in read_metrics(tmp_path / "run") if e["kind"] == "train"]
    losses = [e["loss"] for e in rows]
    # stream windows: every position has a next token to predict, but at the stream's end
    assert all(e["label_tokens"] == e["tokens"] for e in rows[:-1])
    assert 0 < rows[-1]["label_tokens"] <= rows[-1]["tokens"]
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    # Observed over seeds 0-2: 6.23 -> 5.40 (last 10 steps); ln(512) = 6.24 is the uniform start.
    assert start > 6.0 and end < start - 0.6, (start, end)


def test_resume_in_process_is_bit_exact(tmp_path: Path, prepared: Path) -> None:
    config = make_config(tmp_path, prepared, steps=12)
    straight = Trainer(config, tmp_path / "a", log=lambda m: None)
    straight.run(progress=False)
    partial = make_config(tmp_path, prepared, steps=12)
    first = Trainer(partial, tmp_path / "b", log=lambda m: None)
    batches = iter(first.loader)
    for _ in range(6):
        first.train_step(batches)
    first.save()  # as a checkpoint at step 6 would
    second = Trainer(partial, tmp_path / "b", log=lambda m: None)
    second.run(progress=False)
    a, b = straight.parts.models[0].state_dict(), second.parts.models[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_at_random_moments_ends_bit_identical(tmp_path: Path, prepared: Path) -> None:
    path = recipe(tmp_path, prepared, steps=36)
    reference = tmp_path / "reference"
    assert launch_training(path, reference).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    assert train_with_kills(path, killed, kills=3, seed=1) == 3

    want, _ = load_run_model(reference)
    got, step = load_run_model(killed)
    assert step == 36
    a, b = want.state_dict(), got.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert data_stream(killed) == data_stream(reference)
    assert len(data_stream(reference)) == 36


def test_damaged_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, prepared: Path
) -> None:
    config = make_config(tmp_path, prepared, steps=9)
    Trainer(config, tmp_path / "run", log=lambda m: None).run(progress=False)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000006", "step-00000009"]  # keep 2
    shard = next((folder / "step-00000009").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    (folder / ".step-00000012.tmp-x").mkdir()  # what a kill during a save leaves
    messages: list[str] = []
    trainer = Trainer(config, tmp_path / "run", log=messages.append)
    assert trainer.resume() and trainer.step == 6
    assert any("step-00000009 is damaged" in m for m in messages)
    assert not (folder / ".step-00000012.tmp-x").exists()


def test_a_run_directory_refuses_another_model(tmp_path: Path, prepared: Path) -> None:
    Trainer(make_config(tmp_path, prepared, steps=3), tmp_path / "run", log=lambda m: None).run(
        progress=False
    )
    other = make_config(tmp_path, prepared, "--model.n_layers", "3", steps=3)
    with pytest.raises(moegpt.errors.UserError, match=r"different \[model\] section"):
        Trainer(other, tmp_path / "run", log=lambda m: None).run(progress=False)


def test_export_loads_and_converts(tmp_path: Path, prepared: Path, capsys) -> None:
    path = recipe(tmp_path, prepared, steps=6)
    assert main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = moegpt.load(tmp_path / "out")
    trained, _ = load_run_model(tmp_path / "run")
    tokens = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, trained(tokens).logits)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert main(["convert", str(tmp_path / "out"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"


def test_report_writes_plots_and_summary(tmp_path: Path, prepared: Path, capsys) -> None:
    path = recipe(tmp_path, prepared, steps=6, eval_every=3, eval_batches=2)
    main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")])
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run")]) == 0
    for name in ("loss.png", "eval_loss.png", "throughput.png", "expert_load.png"):
        assert (tmp_path / "run" / name).read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "steps: 6" in out and "held-out loss at step 6" in out and "MFU n/a" in out
    # The throughput is the run's median step, not its last.
    rates = [e["tokens_per_second"] for e in read_metrics(tmp_path / "run") if e["kind"] == "train"]
    rates.sort()
    median = (rates[2] + rates[3]) / 2
    assert f"throughput (median over 6 steps): {median:,.0f} tokens/s" in out


def test_dry_run_prints_the_ramp(tmp_path: Path, prepared: Path, capsys) -> None:
    path = recipe(
        tmp_path,
        prepared,
        steps=10,
        global_batch_size=8,
        ramp_start_batch=2,
        ramp_increment=2,
        ramp_samples=24,
    )
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "steps 0-3: batch 2 (8 sequences)" in out and "steps 8-9: batch 8" in out
    assert not (tmp_path / "runs").exists()


def test_ramp_run_consumes_the_planned_batches(tmp_path: Path, prepared: Path) -> None:
    config = make_config(
        tmp_path,
        prepared,
        steps=10,
        global_batch_size=8,
        ramp_start_batch=2,
        ramp_increment=2,
        ramp_samples=24,
    )
    trainer = Trainer(config, tmp_path / "run", log=lambda m: None)
    trainer.run(progress=False)
    events = [e for e in read_metrics(tmp_path / "run") if e["kind"] == "train"]
    # 2 -> 8 in steps of 2 over 24 sequences: one increase per 8 sequences
    expected = [2, 2, 2, 2, 4, 4, 6, 6, 8, 8]
    assert [e["batch_size"] for e in events] == expected
    assert sum(e["tokens"] for e in events) == sum(expected) * 32  # tokens the plan promises
    assert trainer.loader.consumed == sum(expected)


def test_train_flag_combinations(tmp_path: Path, prepared: Path, monkeypatch, capsys) -> None:
    path = recipe(tmp_path, prepared, steps=3)
    run = ["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]
    assert main([*run, "--max-restarts", "-1"]) == 2
    assert main([*run, "--max-restarts", "2", "--resume", "never"]) == 2
    calls: list[list[str]] = []
    monkeypatch.setattr("moegpt.train.supervisor.run_child", lambda cmd: calls.append(cmd) or 0)
    assert main([*run, "--max-restarts", "2", "--dry-run"]) == 0  # prints, never launches
    assert calls == [] and not (tmp_path / "run").exists()
    assert main([*run, "--max-restarts", "2", "--train.lr", "0.002"]) == 0
    (child,) = calls
    assert child[1:4] == ["-m", "moegpt.cli", "train"]
    assert "--train.lr" in child and "0.002" in child and "--config" in child
    assert child[child.index("--resume") + 1] == "auto"
    assert child[child.index("--run-dir") + 1] == str(tmp_path / "run")


def test_an_existing_run_is_never_silently_replaced(tmp_path: Path, prepared: Path) -> None:
    Trainer(make_config(tmp_path, prepared, steps=6), tmp_path / "run", log=lambda m: None).run(
        progress=False
    )
    again = Trainer(make_config(tmp_path, prepared, steps=6), tmp_path / "run", log=print)
    with pytest.raises(moegpt.errors.UserError, match="holds checkpoints of an earlier run"):
        again.run(resume=False, progress=False)
    shorter = Trainer(make_config(tmp_path, prepared, steps=4), tmp_path / "run", log=print)
    with pytest.raises(moegpt.errors.UserError, match="does not fit this config's schedule"):
        shorter.run(progress=False)
    bigger = make_config(tmp_path, prepared, steps=6, global_batch_size=8)
    with pytest.raises(moegpt.errors.UserError, match="does not fit this config's schedule"):
        Trainer(bigger, tmp_path / "run", log=print).run(progress=False)


def test_quickstart_runs_end_to_end(tmp_path: Path, prepared: Path, capsys) -> None:
    from moegpt.quickstart import quickstart

    config = make_config(tmp_path, prepared, steps=4, eval_batches=2)
    scores = quickstart(config, tmp_path / "qs")
    out = capsys.readouterr().out
    for source in ("code", "text"):
        assert scores[f"{source}/loss"] > 0 and scores[f"{source}/unigram_entropy"] > 0
    assert out.count("against a unigram entropy") == 2
    assert (tmp_path / "qs" / "export" / "model.safetensors").is_file()
    assert "5. samples" in out and "def fibonacci(n):" in out


def test_supervisor_relaunches_until_success(monkeypatch) -> None:
    codes = iter([137, 1, 0])
    calls: list[list[str]] = []
    monkeypatch.setattr(
        "moegpt.train.supervisor.run_child", lambda cmd: calls.append(cmd) or next(codes)
    )
    messages: list[str] = []
    assert supervise(["train"], max_restarts=3, log=messages.append) == 0
    assert len(calls) == 3 and len(messages) == 2
    codes = iter([137, 137, 137])
    assert supervise(["train"], max_restarts=1, log=messages.append) == 137
    codes = iter([2])
    assert supervise(["train"], max_restarts=5, log=messages.append) == 2  # usage errors stop
    codes = iter([143])
    assert supervise(["train"], max_restarts=5, log=messages.append) == 143  # so does SIGTERM


@pytest.mark.parametrize(
    "signum, ranks", [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 2)]
)
def test_a_signal_stops_training_after_its_step_with_a_checkpoint(
    tmp_path: Path, prepared: Path, signum: int, ranks: int
) -> None:
    """One process, or the launcher of two FSDP ranks (which passes SIGTERM on to them,
    and they agree on the step to stop after)."""
    config = recipe(tmp_path, prepared, steps=4000 if ranks > 1 else 400, log_every=1)
    command = [sys.executable, "-m", "moegpt.cli", "train", "--config", str(config)]
    command += ["--run-dir", str(tmp_path / "run")]
    if ranks > 1:
        command += ["--nproc", str(ranks), "--parallel.dp_shard", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def logged() -> list[int]:  # every train row written, repeats included
        lines = metrics.read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.endswith("}")]  # not one half-written
        return [r["step"] for r in rows if r["kind"] == "train"]

    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(logged()) >= 4):  # past the first save
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()[-2000:]
        time.sleep(0.05)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, err[-2000:]
    assert err.count("training stopped by") == 1, err[-3000:]
    said = re.search(
        r"training stopped by (\w+) after step (\d+); checkpoint (\S+): the same "
        r"command resumes from step (\d+)",
        err,
    )
    assert said is not None, err[-2000:]
    assert said.group(1) == signal.Signals(signum).name and said.group(2) == said.group(4)
    step = int(said.group(2))
    assert step < 400 and Path(said.group(3)).name == f"step-{step:08d}"
    assert logged()[-1] == step
    # The rerun resumes there: every step logged once.
    done = subprocess.run(
        [*command, "--train.steps", str(step + 3)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"step {step}" in done.stderr
    said_once = " ".join(done.stderr.split())  # the console wraps long lines
    assert re.search(
        r"trained for \d+; the learning-rate schedule follows the new length", said_once
    )
    assert logged() == list(range(1, step + 4))


def test_running_out_of_data_is_caught_before_training(tmp_path: Path, prepared: Path) -> None:
    config = make_config(tmp_path, prepared, steps=100000)
    with pytest.raises(moegpt.errors.UserError, match="train.steps: the run needs"):
        Trainer(config, tmp_path / "run", log=lambda m: None)


def test_model_vocab_size_is_checked_against_the_prepared_tokenizer(
    tmp_path: Path, prepared: Path
) -> None:
    ids = json.loads((prepared / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    small = make_config(tmp_path, prepared, "--model.vocab_size", str(ids - 1))
    with pytest.raises(moegpt.errors.UserError) as refused:
        Trainer(small, tmp_path / "small", log=lambda m: None)
    assert str(refused.value).startswith(f"model.vocab_size: {ids - 1:,} rows for ")
    assert f"{ids:,}-id tokenizer" in str(refused.value)
    said: list[str] = []
    Trainer(
        make_config(tmp_path, prepared, "--model.vocab_size", str(ids + 8)),
        tmp_path / "big",
        log=said.append,
    )
    assert [m for m in said if m.startswith("model.vocab_size")] == [
        f"model.vocab_size: {ids + 8:,} rows for {prepared}'s {ids:,}-id tokenizer: 8 embedding "
        "and output rows never see a token"
    ]


def test_checkpoint_manager_prunes_to_keep(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2, log=lambda m: None)
    for step in (1, 2, 3):
        manager.save(step, {"x": torch.tensor([step])}, {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    latest = manager.latest()
    tensors = {"x": torch.tensor([0])}
    manager.load(latest, tensors)
    assert manager.trainer_state(latest) == {"step": 3} and tensors["x"].item() == 3


def test_a_damaged_validation_file_stops_train_and_inspect_before_any_step(
    tmp_path: Path, prepared: Path, capsys
) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shard = next((data / "text").glob("val-*.tokens.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    config = make_config(tmp_path, data)
    with pytest.raises(moegpt.errors.UserError, match=f"^{shard}: .* bytes, the manifest says"):
        Trainer(config, tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(["data", "inspect", "--config", str(tmp_path / "recipe.toml")]) == 2
    assert f"{shard}: " in capsys.readouterr().err


def test_checkpoints_and_exports_follow_the_umask(tmp_path: Path) -> None:
    """Another account of the same group may read a shared model (umask 027: rwxr-x---)."""
    import os
    import stat

    previous = os.umask(0o027)
    try:
        CheckpointManager(tmp_path / "checkpoints", keep=2, log=lambda m: None).save(
            1, {"x": torch.tensor([1])}, {"step": 1}
        )
        folder = moegpt.save_model(moegpt.Transformer(small_config()), tmp_path / "export")
    finally:
        os.umask(previous)
    step = tmp_path / "checkpoints" / "step-00000001"
    for path in [step, *step.rglob("*"), folder, *folder.iterdir()]:
        want = 0o750 if path.is_dir() else 0o640
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_a_non_finite_gradient_skips_the_update_and_names_its_parameter(
    tmp_path: Path, prepared: Path
) -> None:
    logged: list[str] = []
    trainer = Trainer(make_config(tmp_path, prepared, steps=4), tmp_path / "run", log=logged.append)
    model = trainer.parts.models[0]
    poisoned = dict(model.named_parameters())["layers.1.attention.wo.weight"]
    hook = poisoned.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = iter(trainer.loader)
    assert trainer.train_step(batches)["skipped"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "step 1: non-finite gradient norm" in logged[-1]
    assert "1 gradient, the latest in the model layers.1.attention.wo.weight)" in logged[-1]
    hook.remove()
    assert not trainer.train_step(batches)["skipped"]
    assert not torch.equal(before["layers.1.attention.wo.weight"], poisoned)


def test_evaluation_on_a_step_that_does_not_log_is_not_training_time(
    tmp_path: Path, prepared: Path, monkeypatch
) -> None:
    """log_every 4, eval_every 6: the evaluation at step 6 (made to take 1 s) must not
    land in the tokens/s of steps 7 and 8."""
    config = make_config(
        tmp_path,
        prepared,
        "--checkpoint.every=0",
        steps=8,
        log_every=4,
        eval_every=6,
        global_batch_size=4,
    )
    evaluate = Trainer.evaluate

    def slow(self: Trainer) -> dict:
        time.sleep(1.0)
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", slow)
    Trainer(config, tmp_path / "run", log=lambda m: None).run(progress=False)
    rates = {
        e["step"]: e["tokens_per_second"]
        for e in read_metrics(tmp_path / "run")
        if e["kind"] == "train"
    }
    steps_before = min(rates[5], rates[6])
    # a step of 4 x 64 tokens takes milliseconds: 1 s inside the window would cut it tenfold
    assert rates[8] > steps_before / 3, rates
