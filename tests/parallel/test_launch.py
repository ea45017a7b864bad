"""`moegpt train --nproc`: the layout and the launch agree, with one-line errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moegpt.cli import main
from moegpt.config import ParallelConfig
from moegpt.errors import UserError
from moegpt.parallel.launch import torchrun_command
from moegpt.parallel.mesh import ParallelDims
from tests.conftest import recipe


def test_nproc_must_match_the_layout(tmp_path: Path, prepared: Path, capsys) -> None:
    path = str(recipe(tmp_path, prepared, steps=3))
    assert main(["train", "--config", path, "--nproc", "3", "--parallel.dp_shard", "2"]) == 2
    assert "--nproc: 3 ranks, but the [parallel] layout needs 2" in capsys.readouterr().err


def test_batch_must_split_over_ranks_and_micro_batches(
    tmp_path: Path, prepared: Path, capsys
) -> None:
    path = str(recipe(tmp_path, prepared, steps=3, global_batch_size=6, micro_batch_size=2))
    assert main(["train", "--config", path, "--parallel.dp_shard", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size: a batch of 6 sequences does not split into" in err
    assert "= 4" in err


def test_layout_must_match_the_world() -> None:
    with pytest.raises(UserError, match=r"layout needs dp_replicate x dp_shard x cp x tp x pp = 2"):
        ParallelDims.build(ParallelConfig(tp=2), torch.device("cpu"))


def test_torchrun_command_restarts_and_runs_the_cli() -> None:
    command = torchrun_command(4, 2, ["train", "--config", "c.toml"])
    assert "--nproc-per-node=4" in command and "--max-restarts=2" in command
    assert command[-5:] == ["-m", "moegpt.cli", "train", "--config", "c.toml"]


def test_context_parallel_on_cpu_is_one_line() -> None:
    """PyTorch's ring attention runs on CUDA attention kernels only: a CPU job is refused
    before any rank builds a model."""
    from moegpt.parallel.context import check_device

    check_device(1, torch.device("cpu"))  # no context parallelism: nothing to refuse
    with pytest.raises(UserError, match=r"^parallel.cp: context parallelism \(2 ranks\) runs"):
        check_device(2, torch.device("cpu"))


class _FakeGPU:
    """What ``torch.cuda.get_device_properties`` reports, for a GPU this machine lacks."""

    def __init__(self, total_memory: int) -> None:
        self.total_memory = total_memory
        self.name = "Fake GPU"


@pytest.mark.parametrize("layout", [[], ["--parallel.dp_shard", "2"]])
def test_a_layout_the_gpus_cannot_hold_is_refused_before_any_rank_starts(
    tmp_path: Path, prepared: Path, capsys, monkeypatch, layout: list[str]
) -> None:
    """On GPUs the planner's peak for the most loaded GPU exceeds by more than the margin,
    `train` stops with one line giving that figure, before launching ranks or writing the
    run directory; nearer the edge, or in a dry run, it warns and goes on; --no-memory-check
    and a frozen run are not judged."""
    from moegpt.config import load_config
    from moegpt.plan.memory import training_memory
    from moegpt.plan.plan import MISFIT_MARGIN, PlanOptions, train_layout

    path = str(recipe(tmp_path, prepared, steps=1))
    config = load_config(path, layout)
    planned = training_memory(config.model, train_layout(config, PlanOptions())[0], 0).total
    run_dir = tmp_path / "run"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def gpu(total: float) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: _FakeGPU(int(total)))

    argv = ["train", "--config", path, "--run-dir", str(run_dir), *layout]
    gpu(planned / (1 + MISFIT_MARGIN) - 1)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moegpt: error: parallel: `moegpt plan` puts")
    assert f"at {planned / 1e9:.1f} GB" in err and "Fake GPU" in err
    assert not run_dir.exists()
    assert main([*argv, "--dry-run"]) == 0  # a dry run says it and goes on
    assert "moegpt: warning: parallel: `moegpt plan` puts" in capsys.readouterr().err
    assert main([*argv, "--dry-run", "--no-memory-check"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*argv, "--dry-run", "--train.freeze", "tok_embeddings.*"]) == 0
    assert "warning" not in capsys.readouterr().err
    gpu(planned - 1)  # within the margin: warned, not refused
    assert main([*argv, "--dry-run"]) == 0
    assert "moegpt: warning: parallel:" in capsys.readouterr().err
    gpu(planned)  # held
    assert main([*argv, "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().err
