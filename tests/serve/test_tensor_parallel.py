"""Tensor-parallel serving: `moegpt generate --tp 2` (two gloo ranks under torchrun, rank 0
scheduling and sampling) produces exactly the greedy text of one process, through chunked
prefill and preemption; the step input survives its trip to the followers intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moegpt.serve.runner import ModelInput
from moegpt.serve.tensor_parallel import (
    FIRST_MESSAGE,
    TensorParallelForward,
    TensorParallelGroups,
    follow,
    pack,
    unpack,
)

PROMPTS = ["def parse(text):", "import os\nimport sys", "class Engine:\n    def step(self)"]


def test_step_input_round_trips() -> None:
    inp = ModelInput(
        tokens=[5, 6, 7, 8],
        positions=[0, 1, 2, 9],
        sequences=[(0, 3, 0, 4), (3, 1, 9, 0)],
        copies=[(2, 7)],
        logits_rows=[2, 3],
        tables=[(4, 0, (16, 17, 18)), (0, 2, tuple(range(40, 50))), (1, 3, ())],
    )
    assert unpack(pack(inp)) == (inp, [])
    assert unpack(pack(inp, [1, 3])) == (inp, [1, 3])
    assert unpack(pack(ModelInput(copies=[(1, 2)]))) == (ModelInput(copies=[(1, 2)]), [])


def _generate(model_dir: Path, *flags: str) -> str:
    command = [sys.executable, "-m", "moegpt.cli", "generate", str(model_dir)]
    for prompt in PROMPTS:
        command += ["--prompt", prompt]
    # A small cache and step budget: prompts prefill in chunks and sequences get preempted.
    command += ["--temperature", "0", "--max-tokens", "40", "--num-kv-blocks", "12"]
    command += ["--block-size", "4", "--max-tokens-per-step", "8", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_tp2_greedy_equals_one_process(text_model: Path) -> None:
    alone = _generate(text_model)
    assert all(prompt in alone for prompt in PROMPTS)
    assert _generate(text_model, "--tp", "2") == alone
    # Overlapped, the followers get each decode token over the device group, not the host.
    assert _generate(text_model, "--tp", "2", "--overlap", "on") == alone


class _Recorder:
    """A forward that records what it was asked to run (the channel's test needs no model)."""

    cache = None
    graphs = None
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.steps: list[tuple[ModelInput, list[int] | None, list[int] | None]] = []

    def __call__(self, inp: ModelInput, patch=None) -> torch.Tensor:
        rows, values = patch if patch is not None else (None, None)
        self.steps.append((inp, rows, None if values is None else values.tolist()))
        return torch.empty(0)

    def close(self) -> None:
        pass


def _channel_steps() -> list[tuple[ModelInput, tuple[list[int], torch.Tensor] | None]]:
    """A small step with a token patch, and a step too long for the first message."""
    small = ModelInput([3, 4], [7, 9], [(0, 1, 7, 0), (1, 1, 9, 1)], [], [0, 1], [(1, 0, (5,))])
    blocks = tuple(range(FIRST_MESSAGE))
    big = ModelInput([1] * 8, list(range(8)), [(0, 8, 0, 0)], [(1, 2)], [7], [(0, 0, blocks)])
    return [(small, ([1], torch.tensor([42]))), (big, None)]


def _channel_rank(rank: int, store: str, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    groups = TensorParallelGroups(dist.new_group([0, 1]), dist.new_group([0, 1]))
    recorder = _Recorder()
    if rank == 0:
        forward = TensorParallelForward(recorder, groups)
        for inp, patch in _channel_steps():
            forward(inp, patch)
        forward._sent = 0.0  # idle for long enough: the keep-alive goes out
        forward.keep_alive()
        forward.close()
    else:
        follow(recorder, groups)
    steps = [(inp.__dict__, rows, values) for inp, rows, values in recorder.steps]
    (out / f"rank{rank}.json").write_text(json.dumps(steps))
    dist.destroy_process_group()


def test_followers_run_exactly_the_steps_rank_0_sends(tmp_path: Path) -> None:
    """Through the two channels: a step in one message, one longer than the first message,
    a token patch, a keep-alive between steps, and the release."""
    mp.spawn(_channel_rank, args=(str(tmp_path / "store"), tmp_path), nprocs=2, join=True)
    sent = json.loads((tmp_path / "rank0.json").read_text())
    received = json.loads((tmp_path / "rank1.json").read_text())
    assert len(sent) == 2 and received == sent
    assert received[0][1:] == [[1], [42]]
