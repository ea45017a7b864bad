"""Serving when something fails, on CPU: a tensor-parallel rank killed mid-generation (either
rank) ends the whole job in bounded time with one line naming it; a `moegpt serve --tp 2` whose
follower dies answers its in-flight request with an error and exits, and an idle one outlives
the collective timeout; a request the KV cache cannot hold gets a 400 naming the field, and a
prompt too long for a tensor-parallel `moegpt generate` one line.

(A client that disconnects mid-stream: tests/serve/test_server.py; a failed graph capture:
tests/serve/test_runner_graphs.py.)"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moegpt.config import ServeConfig
from moegpt.harness.faults import child_pids
from moegpt.serve.engine import Engine
from tests.serve.test_server_hardening import MODEL, assert_openai_error, serving

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
EXITED_WITHIN_S = 60  # torchrun stops the other ranks within a second or two


def ranks(launcher: int) -> dict[int, int]:
    """Process id of each rank started under ``launcher``, by RANK in its environment."""
    found: dict[int, int] = {}
    for child in child_pids(launcher):
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [v for k, _, v in (e.partition(b"=") for e in environ) if k == b"RANK"]
        found |= {int(rank[0]): child} if rank else ranks(child)
    return found


def gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" in status.read_text()


def assert_one_line(stderr: str, expected: str) -> None:
    """The error is ``expected`` (a pattern), in one line and no traceback."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert re.fullmatch(f"moegpt: error: {expected}", errors[0]), errors[0]


def stop(launcher: subprocess.Popen) -> None:
    """Kill what is left of a job whose test failed: its ranks, then the launcher."""
    if launcher.poll() is None:
        for pid in ranks(launcher.pid).values():
            os.kill(pid, signal.SIGKILL)
        launcher.kill()


def generate(model: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "moegpt.cli", "generate", str(model), "--tp", "2"]
    command += ["--temperature", "0", *flags]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("victim", [1, 0], ids=["follower", "rank 0"])
def test_a_rank_killed_mid_generation_ends_the_job_with_one_line(
    text_model: Path, victim: int
) -> None:
    job = generate(text_model, "--prompt", "def f(x):", "--max-tokens", "100", "--ignore-eos")
    try:
        assert job.stdout.read(5) == b"def f"  # streaming: the ranks are stepping
        pids = ranks(job.pid)
        os.kill(pids[victim], signal.SIGKILL)
        _, err = job.communicate(timeout=EXITED_WITHIN_S)
    finally:
        stop(job)
    assert job.returncode == 1
    assert_one_line(
        err.decode(),
        rf"tensor-parallel rank {victim} died \(SIGKILL\); the other ranks were stopped",
    )
    assert all(gone(pid) for pid in pids.values())


def test_a_prompt_too_long_for_tensor_parallel_generate_is_one_line(text_model: Path) -> None:
    job = generate(text_model, "--prompt", "x = 1\n" * 200)
    try:
        _, err = job.communicate(timeout=EXITED_WITHIN_S)
    finally:
        stop(job)
    assert job.returncode == 2
    assert_one_line(err.decode(), r"prompt: \d+ tokens leave no room in the 128-token context")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(server: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert server.poll() is None, server.stderr.read()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)


def test_a_tensor_parallel_server_idles_past_the_timeout_and_exits_when_a_follower_dies(
    text_model: Path,
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moegpt.cli", "serve", str(text_model), "--tp", "2"]
    command += ["--port", str(port), "--served-model-name", MODEL, "--num-kv-blocks", "64"]
    timeout_s = 2  # the collective timeout: the followers wait longer than that for a request
    command += ["--parallel.timeout_s", str(timeout_s)]
    server = subprocess.Popen(command, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        wait_up(server, url)
        time.sleep(2 * timeout_s)
        body = {"model": MODEL, "prompt": "def f", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        body |= {"max_tokens": 100, "stream": True}  # greedy: no end of text before the kill
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(ranks(server.pid)[1], signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-2].startswith('data: {"error": ') and rest[-1] == "data: [DONE]"
        assert server.wait(timeout=EXITED_WITHIN_S) == 1
    finally:
        stop(server)
    err = server.stderr.read()
    assert_one_line(err, r"tensor-parallel rank 1 died \(SIGKILL\); the other ranks were stopped")


def test_requests_the_kv_cache_cannot_hold_get_400s_naming_the_field(text_model: Path) -> None:
    # 4 blocks of 16 tokens: a 64-token cache, under the model's 128-token context
    config = ServeConfig(num_kv_blocks=4, block_size=16, calibrate=False)
    engine = Engine.from_folder(text_model, config, device="cpu")
    with serving(engine) as live:
        r = live.post("/v1/completions", {"model": MODEL, "prompt": list(range(1, 70))})
        message = assert_openai_error(r, 400, "prompt")["message"]
        assert message == "prompt: 69 tokens leave no room in the 64-token KV cache"
        body = {"model": MODEL, "prompt": [1, 2, 3, 4], "max_tokens": 100}
        message = assert_openai_error(live.post("/v1/completions", body), 400, "max_tokens")
        assert "must be in 1..60" in message["message"]
        assert live.post("/v1/completions", {**body, "max_tokens": 60}).status_code == 200
        assert engine.allocator.used == 0


@pytest.mark.parametrize("tp", ["1", "2"])
def test_a_busy_port_fails_in_one_line_before_the_model_loads(text_model: Path, tp: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "moegpt.cli", "serve", str(text_model)]
        command += ["--port", str(port), "--tp", tp]
        done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert_one_line(
        done.stderr, rf"--port: cannot listen on 127\.0\.0\.1:{port} \(Address already in use\)"
    )
    assert "serving" not in done.stderr and "loading" not in done.stderr
