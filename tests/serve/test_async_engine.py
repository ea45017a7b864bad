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
