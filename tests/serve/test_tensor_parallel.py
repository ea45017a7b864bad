"""Tensor-parallel serving: `moegpt generate --tp 2` (two gloo ranks under torchrun, rank 0
scheduling and sampling) produces exactly the greedy text of one process, through chunked
prefill and preemption; the step input survives its trip to the followers intact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from moegpt.serve.runner import ModelInput
from moegpt.serve.tensor_parallel import pack, unpack

PROMPTS = ["def parse(text):", "import os\nimport sys", "class Engine:\n    def step(self)"]


def test_step_input_round_trips() -> None:
    inp = ModelInput(
        tokens=[5, 6, 7, 8],
        positions=[0, 1, 2, 9],
        sequences=[(0, 3, 0, [16, 17, 18]), (3, 1, 9, list(range(40, 50)))],
        copies=[(2, 7)],
        logits_rows=[2, 3],
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
