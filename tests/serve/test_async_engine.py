"""Streaming through asyncio: concurrent streams get their tokens (equal to the batch API),
and a consumer that leaves early frees its blocks."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from moegpt.config import ServeConfig
from moegpt.model import Transformer
from moegpt.serve.async_engine import AsyncEngine
from moegpt.serve.engine import Engine
from moegpt.serve.sequence import SamplingParams
from tests.conftest import small_config


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config(max_seq_len=64)).eval()


def test_concurrent_streams_and_early_exit(model: Transformer) -> None:
    params = SamplingParams(max_tokens=12, temperature=0)
    prompts = [[i + 1, i + 2, i + 3] for i in range(8)]
    expected = Engine(model, config=ServeConfig(num_kv_blocks=64)).generate(prompts, params)
    engine = AsyncEngine(Engine(model, config=ServeConfig(num_kv_blocks=64, block_size=4)))

    async def collect(prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for out in engine.stream(prompt, params):
            tokens += out.token_ids
        return tokens

    async def leave_early(prompt: list[int]) -> None:
        async for _ in engine.stream(prompt, SamplingParams(max_tokens=40, temperature=0)):
            break  # a client that hung up after its first token

    async def main() -> list[list[int]]:
        results = await asyncio.gather(*(collect(p) for p in prompts), leave_early([9, 9]))
        return results[:-1]

    try:
        got = asyncio.run(main())
        assert got == [c[0].token_ids for c in expected]
        assert engine.engine.allocator.used == 0 and not engine.engine.has_work()
    finally:
        engine.shutdown()


def test_a_request_posted_during_a_failed_step_fails_with_it(model: Transformer) -> None:
    """A step that raises ends every request with its error, including one whose submission
    arrived while the step ran: it must not go on generating for nobody."""
    engine = Engine(model, config=ServeConfig(num_kv_blocks=64, block_size=4))
    entered, posted = threading.Event(), threading.Event()
    steps = []

    def failing_step() -> list:
        steps.append(1)
        entered.set()
        posted.wait(timeout=10)
        raise RuntimeError("the device fell over")

    engine.step = failing_step
    server = AsyncEngine(engine)
    params = SamplingParams(max_tokens=40, temperature=0)

    async def drain(stream) -> BaseException | None:
        try:
            async for _ in stream:
                pass
        except RuntimeError as e:
            return e
        return None

    async def main() -> list:
        first = asyncio.ensure_future(drain(server.stream([1, 2, 3], params)))
        await asyncio.to_thread(entered.wait, 10)
        second = asyncio.ensure_future(drain(server.stream([4, 5, 6], params)))
        await asyncio.sleep(0)  # its submission is in the mailbox while the step runs
        posted.set()
        return await asyncio.gather(first, second)

    try:
        errors = asyncio.run(main())
        assert [str(e) for e in errors] == ["the device fell over"] * 2
        time.sleep(0.3)  # the engine thread would have taken the orphan in by now
        assert len(steps) == 1 and not engine.has_work() and engine.allocator.used == 0
    finally:
        server.shutdown()


def test_a_prompt_scored_alone_may_fill_the_context(model: Transformer) -> None:
    """max_tokens 0 leaves no room to need: streamed, as through generate, the prompt's
    log-probabilities come back."""
    ids = list(range(1, 65))  # the whole 64-token context
    params = SamplingParams(max_tokens=0, prompt_logprobs=True)
    plain = Engine(model, config=ServeConfig(num_kv_blocks=32))
    plain.add_request(ids, params)
    want = [o.prompt_logprobs for o in plain.step() if o.prompt_logprobs is not None]
    engine = AsyncEngine(Engine(model, config=ServeConfig(num_kv_blocks=32)))

    async def scored() -> list:
        return [out.prompt_logprobs async for out in engine.stream(ids, params)]

    try:
        got = [p for p in asyncio.run(scored()) if p is not None]
        assert got[0] == pytest.approx(want[0]) and len(got[0]) == 64
    finally:
        engine.shutdown()


def test_a_step_that_leaves_the_ranks_out_of_step_stops_the_server(
    model: Transformer, monkeypatch
) -> None:
    """Tensor-parallel ranks out of step cannot run another step: the request fails, the
    server shuts down, and serve() raises (rank 0 exits, and torchrun stops the others)."""
    import httpx

    from moegpt.serve.server import listening_socket, serve

    engine = Engine(model, config=ServeConfig(num_kv_blocks=32))

    def lost() -> list:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", lost)
    monkeypatch.setattr(AsyncEngine, "_out_of_step", lambda self: True)
    async_engine = AsyncEngine(engine)
    sock = listening_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ended: list[BaseException] = []

    def run() -> None:
        try:
            serve(async_engine, "m", sock, None)
        except RuntimeError as e:
            ended.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            assert httpx.get(f"{url}/health").status_code == 200
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}
    failed = httpx.post(f"{url}/v1/completions", json=body, timeout=20)
    assert failed.status_code == 500 and "device lost" in failed.text
    thread.join(timeout=20)
    assert not thread.is_alive() and "failed step: device lost" in str(ended[0])
    with pytest.raises(RuntimeError, match="engine stopped after a failed step"):
        async_engine.stream([1, 2], SamplingParams(max_tokens=1))


def test_health_says_when_the_engine_stopped(model: Transformer) -> None:
    from fastapi.testclient import TestClient

    from moegpt.serve.server import build_app

    async_engine = AsyncEngine(Engine(model, config=ServeConfig(num_kv_blocks=32)))
    try:
        client = TestClient(build_app(async_engine, "m"))
        assert client.get("/health").json() == {"status": "ok"}
        async_engine.dead = RuntimeError("device lost")
        stopped = client.get("/health")
        assert stopped.status_code == 503 and "device lost" in stopped.json()["error"]["message"]
    finally:
        async_engine.shutdown()


def test_a_request_tokenised_while_the_engine_dies_is_refused(
    model: Transformer, monkeypatch
) -> None:
    """B passes the check before the engine dies and registers after: it is refused rather
    than left waiting for an engine that will never answer."""
    engine = Engine(model, config=ServeConfig(num_kv_blocks=32))
    b_inside, died = threading.Event(), threading.Event()

    def lost() -> list:
        b_inside.wait(5)
        raise RuntimeError("device lost")

    encode = engine.encode

    def slow(prompt: list[int]) -> list[int]:
        if prompt == [7, 8]:  # B: still tokenising while the engine dies
            b_inside.set()
            died.wait(5)
        return encode(prompt)

    monkeypatch.setattr(engine, "step", lost)
    monkeypatch.setattr(engine, "encode", slow)
    monkeypatch.setattr(AsyncEngine, "_out_of_step", lambda self: True)
    async_engine = AsyncEngine(engine)
    async_engine.on_dead = died.set

    async def answer(prompt: list[int]) -> str:
        try:
            return str([o async for o in async_engine.stream(prompt, SamplingParams(max_tokens=2))])
        except RuntimeError as e:
            return str(e)

    async def main() -> list[str]:
        first = asyncio.create_task(answer([1, 2, 3]))
        await asyncio.sleep(0)  # A is posted and its step fails once B is inside
        second = asyncio.create_task(answer([7, 8]))
        return list(await asyncio.wait_for(asyncio.gather(first, second), 10))

    got = asyncio.run(main())
    assert got[0] == "device lost" and "engine stopped after a failed step" in got[1]


def test_an_idle_server_whose_group_broke_stops(model: Transformer) -> None:
    """The keep-alive a waiting rank 0 sends fails (a follower died): the engine stops at
    once rather than at the next request."""
    from moegpt.serve.tensor_parallel import TensorParallelForward

    engine = Engine(model, config=ServeConfig(num_kv_blocks=32))
    broken = TensorParallelForward.__new__(TensorParallelForward)  # no groups: none is used
    broken.failed = RuntimeError("connection reset by follower")
    broken.keep_alive = lambda: None
    died = threading.Event()
    async_engine = AsyncEngine(engine)
    async_engine.on_dead = died.set
    engine.forward = broken  # while the engine thread waits for work
    assert died.wait(5) and "connection reset" in str(async_engine.dead)
