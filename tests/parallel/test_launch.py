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
