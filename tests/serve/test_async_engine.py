"""Streaming through asyncio: concurrent streams get their tokens (equal to the batch API),
and a consumer that leaves early frees its blocks."""

from __future__ import annotations

import asyncio

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
