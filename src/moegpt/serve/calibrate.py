"""Start-up calibration of the step-time model: time synthetic steps that span the shapes the
scheduler will choose between (decode batches of 1 to ``max_batch_size`` over short and long
contexts, prefill chunks up to ``max_tokens_per_step``) and fit :class:`StepCostModel` to
them, so the latency bound holds from the first request instead of after a refit."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moegpt.serve.blocks import BlockAllocator, BlockTable
from moegpt.serve.cost import Sample, StepCostModel
from moegpt.serve.graphs import batch_ladder
from moegpt.serve.runner import Forward, ModelInput
from moegpt.serve.sampler import sample_batch
from moegpt.serve.scheduler import SchedulerConfig
from moegpt.serve.sequence import SamplingParams

GREEDY = SamplingParams(temperature=0)


def _powers_of_two(limit: int) -> list[int]:
    values, v = [], 1
    while v < limit:
        values.append(v)
        v *= 2
    return [*values, limit]


def step_shapes(
    config: SchedulerConfig, max_context: int, free_blocks: int, block_size: int
) -> Iterator[list[tuple[int, int]]]:
    """Synthetic steps as lists of (tokens already cached, new tokens) per sequence, each
    fitting ``free_blocks`` cache blocks (every sequence takes whole blocks)."""

    def blocks(tokens: int) -> int:
        return -(-tokens // block_size)

    contexts = sorted({min(64, max_context // 4), max_context // 2})
    # Decodes at the decode graphs' padded batch sizes: a decode step costs what its bucket
    # costs, and the step-time model prices a batch by the smallest measured one above it.
    for batch in batch_ladder(config.max_batch_size):
        for context in contexts:
            if batch * blocks(context + 1) <= free_blocks:
                yield [(context, 1)] * batch
    for chunk in _powers_of_two(min(config.max_tokens_per_step, max_context - 1)):
        if chunk >= 16 and blocks(chunk) <= free_blocks:
            yield [(0, chunk)]


def _synthetic_input(shape: list[tuple[int, int]], tables: list[BlockTable]) -> ModelInput:
    """A step of ``shape`` over ``tables``, in the forward's block-table rows 0, 1, ...: it
    runs at start-up, before a request holds any row (a request's first step sends its whole
    table again anyway)."""
    inp = ModelInput()
    for row, ((past, new), table) in enumerate(zip(shape, tables, strict=True)):
        inp.add_sequence(new, past, row, table.blocks)
        inp.tokens += [0] * new
        inp.positions += list(range(past, past + new))
        inp.logits_rows.append(len(inp.tokens) - 1)
    return inp


@contextmanager
def _borrowed(allocator: BlockAllocator, shape: list[tuple[int, int]]) -> Iterator[ModelInput]:
    """A synthetic step of ``shape`` in cache blocks borrowed from ``allocator`` for the
    duration."""
    tables = [BlockTable(allocator) for _ in shape]
    try:
        for (past, new), table in zip(shape, tables, strict=True):
            table.grow(0, past + new)
        yield _synthetic_input(shape, tables)
    finally:
        for table in tables:
            table.free()


@torch.no_grad()
def warm_up_packed_steps(forward: Forward, allocator: BlockAllocator) -> None:
    """Run two packed steps (prompt chunks, and a prompt chunk beside a decode) before the
    first request: the compiled block specialises for packed steps on its first one, which
    would otherwise stall the first requests for the length of a compilation."""
    for shape in ([(0, 24), (0, 40)], [(0, 17), (8, 1)]):
        with _borrowed(allocator, shape) as inp:
            _run_and_sample(forward, inp)


def _run_and_sample(forward: Forward, inp: ModelInput) -> None:
    """The forward and the batch's draw: what an engine step costs besides its bookkeeping
    (the draw also waits for the device)."""
    logits = forward(inp)
    sample_batch(logits, [GREEDY] * len(logits), [None] * len(logits))


def measure(
    forward: Forward,
    allocator: BlockAllocator,
    config: SchedulerConfig,
    max_context: int,
    repeats: int = 2,
) -> list[Sample]:
    """Time each synthetic step (the fastest of ``repeats`` runs after a warm-up) in cache
    blocks borrowed from ``allocator`` and returned before this returns."""
    samples = []
    for shape in step_shapes(config, max_context, allocator.free, allocator.block_size):
        with _borrowed(allocator, shape) as inp:
            _run_and_sample(forward, inp)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                _run_and_sample(forward, inp)
                best = min(best, time.perf_counter() - start)
        keys = sum(new * (past + new) for past, new in shape)
        mixed = any(new != 1 for _, new in shape)
        samples.append((len(inp.tokens), keys, len(shape), int(mixed), best))
    return samples


@torch.no_grad()
def calibrate(
    forward: Forward,
    allocator: BlockAllocator,
    config: SchedulerConfig,
    max_context: int,
) -> tuple[StepCostModel, list[Sample]]:
    samples = measure(forward, allocator, config, max_context)
    return StepCostModel.fit(samples), samples
