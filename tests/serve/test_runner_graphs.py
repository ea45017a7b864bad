"""The model forward's graph path: which steps take it, that they give the eager padded
path's logits, and that a failed capture leaves a working eager forward with one warning."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from moegpt.config import ServeConfig
from moegpt.model import Transformer
from moegpt.serve.graphs import DecodeGraphs
from moegpt.serve.paged import PagedKVCache
from moegpt.serve.runner import (
    ModelForward,
    ModelInput,
    capture_graphs,
    graph_context,
    graph_q_lens,
)
from tests.conftest import small_config

BLOCK = 4


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config(max_seq_len=64)).eval()


def graph_forward(model: Transformer) -> ModelForward:
    """A padded-mode forward whose graphs run eagerly over their buffers (CPU)."""
    cache = PagedKVCache(
        model.config, 32, BLOCK, torch.float32, torch.device("cpu"), spare_block=True
    )
    graphs = DecodeGraphs(model, cache, max_batch_size=8, max_context=64, q_lens=(1, 3))
    return ModelForward(model, cache, torch.device("cpu"), batch_invariant=False, graphs=graphs)


def prefill(forward: ModelForward, prompts: list[list[int]]) -> list[list[int]]:
    """Prefill ``prompts`` into consecutive blocks; their block tables."""
    inp, tables, first = ModelInput(), [], 0
    for row, prompt in enumerate(prompts):
        blocks = list(range(first, first + 4))  # room for 16 tokens
        first += 4
        inp.add_sequence(len(prompt), 0, row, blocks)
        inp.tokens += prompt
        inp.positions += range(len(prompt))
        inp.logits_rows.append(len(inp.tokens) - 1)
        tables.append(blocks)
    forward(inp)
    return tables


def step_input(prompts: list[list[int]], tables: list[list[int]], new: list[list[int]]):
    inp = ModelInput()
    for row, (prompt, blocks, tokens) in enumerate(zip(prompts, tables, new, strict=True)):
        offset = len(inp.tokens)
        inp.add_sequence(len(tokens), len(prompt), row, blocks)
        inp.tokens += tokens
        inp.positions += range(len(prompt), len(prompt) + len(tokens))
        inp.logits_rows += range(offset, offset + len(tokens))
    return inp


@pytest.mark.parametrize("q_len", [1, 3])
def test_uniform_steps_replay_and_match_the_eager_path(model: Transformer, q_len: int) -> None:
    forward = graph_forward(model)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3, 1, 4, 1, 5, 9, 2]]
    tables = prefill(forward, prompts)
    inp = step_input(prompts, tables, [[20 + i] * q_len for i in range(3)])
    assert forward._uniform(inp) == q_len
    replayed = forward(inp)
    eager = forward._eager(inp)  # writes the same keys to the same slots again
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)


def test_mixed_steps_and_uncaptured_shapes_run_eagerly(model: Transformer) -> None:
    forward = graph_forward(model)
    prompts = [[5, 6, 7], [11, 12]]
    tables = prefill(forward, prompts)
    mixed = step_input(prompts, tables, [[1], [2, 3]])
    assert forward._uniform(mixed) == 0  # one decodes, one verifies a proposal
    two = step_input(prompts, tables, [[1, 2], [3, 4]])
    assert forward._uniform(two) == 0  # no graphs for 2 new tokens each (only 1 and 3)
    prompt_end = step_input(prompts, tables, [[1], [2]])
    prompt_end.logits_rows = prompt_end.logits_rows[1:]  # not every row is sampled
    assert forward._uniform(prompt_end) == 0


def test_failed_capture_falls_back_with_one_warning(model: Transformer, capsys) -> None:
    cache = PagedKVCache(
        model.config, 32, BLOCK, torch.float32, torch.device("cpu"), spare_block=True
    )
    assert capture_graphs(model, cache, ServeConfig(max_batch_size=4)) is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "CUDA graph capture failed" in lines[0]
    assert "decoding runs eagerly" in lines[0]


def test_failed_compilation_captures_uncompiled_with_one_warning(
    model: Transformer, capsys, monkeypatch
) -> None:
    """Where compiling the step fails but graphs could be captured, they are, uncompiled
    (capture itself is stood in for: CPU has no CUDA graphs)."""
    captured = []

    def capture(graphs: DecodeGraphs) -> None:
        if graphs.compiled:
            raise RuntimeError("inductor: no kernel for this op\nmore detail")
        captured.append(graphs)

    monkeypatch.setattr(DecodeGraphs, "blocker", lambda graphs: None)
    monkeypatch.setattr(DecodeGraphs, "capture", capture)
    cache = PagedKVCache(
        model.config, 32, BLOCK, torch.float32, torch.device("cpu"), spare_block=True
    )
    graphs = capture_graphs(model, cache, ServeConfig(max_batch_size=4, compile=True))
    assert graphs is not None and not graphs.compiled and captured == [graphs]
    warning, done = capsys.readouterr().err.strip().splitlines()
    assert "compiling the decode step failed (RuntimeError: inductor: no kernel" in warning
    assert "more detail" not in warning and "capturing it uncompiled" in warning
    assert "captured 0 CUDA graphs" in done  # the stand-in capture recorded none


def test_verify_graphs_only_when_speculating_fits_a_block() -> None:
    assert graph_q_lens(ServeConfig()) == (1,)
    assert graph_q_lens(ServeConfig(ngram=True, spec_tokens=4, block_size=16)) == (1, 5)
    assert graph_q_lens(ServeConfig(ngram=True, speculation="off")) == (1,)
    assert graph_q_lens(ServeConfig(ngram=True, spec_tokens=4, block_size=4)) == (1,)


def test_close_destroys_the_graphs_without_the_cycle_collector(model) -> None:
    """NCCL's teardown waits for graphs that captured its collectives: ``close`` must destroy
    them there and then, not leave them to a later garbage collection (a two-GPU run hung at
    exit in ``destroy_process_group``)."""
    forward = graph_forward(model)
    destroyed = []

    class CapturedGraph:  # stands in for a torch.cuda.CUDAGraph, which CPU cannot capture
        def reset(self) -> None:
            destroyed.append(self)

    forward.graphs._graphs[(1, 1, 1)] = CapturedGraph()
    graphs = weakref.ref(forward.graphs)
    gc.disable()
    try:
        forward.close()
        assert graphs() is None, "the decode graphs outlived close()"
    finally:
        gc.enable()
    assert len(destroyed) == 1


def test_a_draft_shorter_than_the_served_context_gets_graphs_of_its_own_length() -> None:
    """A 64-token draft beside a 128-token target: its graphs cover 64 tokens rather than
    refusing serve.max_model_len (only the target must hold the served context)."""
    draft = Transformer(small_config(max_seq_len=64))
    config = ServeConfig(max_model_len=128)
    assert graph_context(draft, config, cached_tokens=4096) == 64
    assert graph_context(draft, config, cached_tokens=48) == 48
    target = Transformer(small_config(max_seq_len=256))
    assert graph_context(target, config, cached_tokens=4096) == 128
