"""The graph-ready decode step (block tables, fixed shapes, padded batches) against the
per-sequence paged path, and DecodeGraphs' buckets. CPU: the same buffers run eagerly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moegpt.model import Transformer
from moegpt.model.moe import GroupedExperts
from moegpt.serve import paged
from moegpt.serve.graphs import DecodeGraphs, batch_ladder, host_sync_reason, window_ladder
from moegpt.serve.paged import PagedKVCache, PagedStep, SequenceSlice
from moegpt.serve.table_rows import BlockTableRows
from tests.conftest import small_config
from tests.serve.flash_reference import reference_flash

BLOCK = 4
BLOCKS = 24


def make_cache(model: Transformer) -> PagedKVCache:
    return PagedKVCache(
        model.config, BLOCKS, BLOCK, torch.float32, torch.device("cpu"), spare_block=True
    )


def slots_of(table: list[int], start: int, stop: int) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, stop)]


def per_sequence_step(
    model: Transformer,
    cache: PagedKVCache,
    tables: list[list[int]],
    past: list[int],
    tokens: list[list[int]],
) -> torch.Tensor:
    """The batch-invariant reference: one packed forward, each sequence attending alone."""
    sequences, slots, new_slots, flat, positions = [], [], [], [], []
    for table, cached, new in zip(tables, past, tokens, strict=True):
        end = cached + len(new)
        sequences.append(SequenceSlice(len(flat), len(new), cached, len(slots)))
        slots += slots_of(table, 0, end)
        new_slots += slots_of(table, cached, end)
        flat += new
        positions += range(cached, end)
    step = PagedStep(cache, torch.tensor(slots), torch.tensor(new_slots), sequences)
    with torch.inference_mode():
        out = model(torch.tensor([flat]), positions=torch.tensor([positions]), cache=step)
    return out.logits[0]


def padded_tables(
    graphs: DecodeGraphs, tables: list[list[int]], q_len: int, context: int
) -> np.ndarray:
    """``tables`` padded to their bucket's window with the scratch block, as the runner's
    :class:`BlockTableRows` gathers them."""
    rows = BlockTableRows(fill=graphs.cache.scratch_block)
    rows.apply((row, 0, tuple(table)) for row, table in enumerate(tables))
    window = graphs.bucket(len(tables), q_len, context)[2]
    return rows.gather(np.arange(len(tables)), window)


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("q_len", [1, 3])
def test_padded_block_table_step_equals_per_sequence_path(
    kv_heads: int, q_len: int, flash: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through SDPA under a mask (CPU), and with ``flash`` through the GPU's path (the window's
    blocks gathered, offsets and key counts for FlashAttention), its kernel stood in for by
    :func:`reference_flash`."""
    if flash:
        monkeypatch.setattr(paged, "flash_applies", lambda cache: True)
        monkeypatch.setattr(paged, "flash_varlen", reference_flash)
    model = Transformer(small_config(n_kv_heads=kv_heads)).eval()
    reference = make_cache(model)
    past = [5, 11, 2]  # mixed contexts; 3 sequences pad to a batch of 4
    order = torch.randperm(BLOCKS).tolist()  # blocks scattered over the cache
    tables = []
    for cached in past:
        need = math.ceil((cached + q_len) / BLOCK)
        tables.append(order[:need])
        order = order[need:]
    prompts = [torch.randint(97, (n,)).tolist() for n in past]
    per_sequence_step(model, reference, tables, [0] * len(past), prompts)

    fast = make_cache(model)
    fast.k.copy_(reference.k)
    fast.v.copy_(reference.v)
    new = [torch.randint(97, (q_len,)).tolist() for _ in past]
    expected = per_sequence_step(model, reference, tables, past, new)

    new_slots = [slots_of(t, c, c + q_len) for t, c in zip(tables, past, strict=True)]
    graphs = DecodeGraphs(model, fast, max_batch_size=8, max_context=32, q_lens=(1, 3))
    assert graphs.bucket(len(past), q_len, max(past) + q_len)[0] == 4
    logits = graphs.run(
        tokens=[t for seq in new for t in seq],
        positions=[p for cached in past for p in range(cached, cached + q_len)],
        slot_mapping=np.array([s for slots in new_slots for s in slots]),
        block_tables=padded_tables(graphs, tables, q_len, max(past) + q_len),
        context_lens=np.array([cached + q_len for cached in past]),
        q_len=q_len,
    )
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)

    # Real rows wrote what the reference wrote; padding wrote the scratch block and nothing else.
    scratch = BLOCKS * BLOCK  # its first slot
    for got, want in ((fast.k, reference.k), (fast.v, reference.v)):
        torch.testing.assert_close(got[:, :scratch], want[:, :scratch], rtol=0, atol=1e-5)
        assert want[:, scratch:].count_nonzero() == 0
        assert got[:, scratch : scratch + q_len].count_nonzero() > 0


def test_spare_block_is_past_the_allocators_blocks() -> None:
    config = small_config()
    cache = PagedKVCache(config, 10, BLOCK, torch.float32, torch.device("cpu"), spare_block=True)
    assert (cache.num_blocks, cache.scratch_block) == (10, 10)
    assert cache.k.shape[1] == 11 * BLOCK
    plain = PagedKVCache(config, 10, BLOCK, torch.float32, torch.device("cpu"))
    assert plain.scratch_block is None and plain.k.shape[1] == 10 * BLOCK
    with pytest.raises(ValueError, match="spare block"):
        DecodeGraphs(Transformer(config), plain, max_batch_size=4, max_context=32)


def test_ladders() -> None:
    assert batch_ladder(256)[:8] == [1, 2, 4, 8, 16, 24, 32, 48]
    assert batch_ladder(256)[-2:] == [240, 256]
    assert batch_ladder(10) == [1, 2, 4, 8, 10]
    assert batch_ladder(1) == [1]
    assert window_ladder(128) == [2, 4, 8, 16, 32, 64, 128]
    assert window_ladder(6) == [2, 4, 6]
    assert window_ladder(2) == [2]
    assert window_ladder(1) == [1]


def test_buckets_pick_the_smallest_that_fits() -> None:
    model = Transformer(small_config()).eval()
    graphs = DecodeGraphs(model, make_cache(model), max_batch_size=8, max_context=30, q_lens=(1, 3))
    assert graphs.bucket(3, 1, 14) == (4, 1, 4)  # 14 keys: 4 blocks
    assert graphs.bucket(1, 1, 4) == (1, 1, 2)  # no window of one block
    assert graphs.bucket(5, 3, 17) == (8, 3, 8)  # 5 blocks: the window of 8 (ceil(30 / 4))
    assert graphs.fits(8, 3, 32)  # the last window rounds max_context up to whole blocks
    assert not graphs.fits(9, 1, 10)  # too many sequences
    assert not graphs.fits(1, 1, 33)  # too long
    assert not graphs.fits(1, 2, 10)  # no ladder for q_len 2
    with pytest.raises(ValueError, match="no bucket"):
        graphs.run([1] * 9, [0] * 9, np.zeros(9), np.zeros((9, 2)), np.ones(9), q_len=1)


@pytest.mark.parametrize("flash", [False, True])
def test_compiled_step_matches_eager_and_compiles_once_across_buckets_and_layers(
    flash: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled step (bf16: the grouped GEMM, as on a GPU) gives the uncompiled step's
    logits and writes the same keys and values into every layer; compiled by block, the
    compilations grow neither with the buckets nor with depth. With ``flash``, through the
    GPU's attention op (its kernel stood in for by the contract written out)."""
    if flash:
        monkeypatch.setattr(paged, "flash_applies", lambda cache: True)
        monkeypatch.setattr(paged, "flash_varlen", reference_flash)
    torch._dynamo.reset()
    model = Transformer(small_config(n_layers=4)).to(torch.bfloat16).eval()
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.use_grouped_mm = True  # the sync-free path CUDA graphs capture
    caches = [
        PagedKVCache(
            model.config, BLOCKS, BLOCK, torch.bfloat16, torch.device("cpu"), spare_block=True
        )
        for _ in range(2)
    ]
    for ours, theirs in ((caches[1].k, caches[0].k), (caches[1].v, caches[0].v)):
        ours.copy_(theirs.normal_())
    eager = DecodeGraphs(model, caches[0], max_batch_size=8, max_context=32)
    compiled = DecodeGraphs(model, caches[1], max_batch_size=8, max_context=32, compile=True)
    assert compiled.compiled and not eager.compiled
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    frames = []
    for batch, context in ((7, 12), (3, 6), (2, 30), (1, 9)):
        need = math.ceil(context / BLOCK)
        tables = [list(range(need * b, need * (b + 1))) for b in range(batch)]
        step = dict(
            tokens=torch.randint(97, (batch,)).tolist(),
            positions=[context - 1] * batch,
            slot_mapping=np.array([slots_of(t, context - 1, context)[0] for t in tables]),
            block_tables=padded_tables(eager, tables, 1, context),
            context_lens=np.array([context] * batch),
            q_len=1,
        )
        want = eager.run(**step).float().clone()
        got = compiled.run(**step).float()
        torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())
        for ours, theirs in ((caches[1].k, caches[0].k), (caches[1].v, caches[0].v)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0.05)
        frames.append(counters["stats"]["unique_graphs"] - before)
    # Batch 8 (16 routed rows: the grouped GEMM); batches 4 and 2 (at most 8 rows: the expert
    # GEMV) share one compilation across windows 2 and 8; a batch of one specialises. (On a
    # GPU the dense projections' GEMV at up to 2 rows splits batches 4 and 2 once more.)
    assert frames == [1, 2, 2, 3]


def test_capture_refuses_what_it_cannot_capture() -> None:
    model = Transformer(small_config()).eval()
    with pytest.raises(RuntimeError, match="CUDA device"):
        DecodeGraphs(model, make_cache(model), max_batch_size=2, max_context=8).capture()
    cuda = torch.device("cuda")
    assert "loop with a host sync in torch.float32" in host_sync_reason(model, cuda)
    assert host_sync_reason(model.to(torch.bfloat16), cuda) is None
