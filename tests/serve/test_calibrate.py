"""Start-up calibration: the synthetic steps span the scheduler's choices within the cache,
the fit recovers a known step-time law, and the engine gets its model with every block free."""

from __future__ import annotations

import torch

from moegpt.config import ServeConfig
from moegpt.model import Transformer
from moegpt.serve import calibrate as calibrate_module
from moegpt.serve.blocks import BlockAllocator
from moegpt.serve.calibrate import calibrate, step_shapes
from moegpt.serve.engine import Engine
from moegpt.serve.runner import ModelInput
from moegpt.serve.scheduler import SchedulerConfig
from tests.conftest import small_config


def test_shapes_span_batches_and_chunks_within_the_cache() -> None:
    """Decodes at every padded batch size the decode graphs run (a step costs its bucket's
    time: the step-time model prices a batch by the smallest measured one above it, so a
    bucket left out, 24 say, would be priced as 32's)."""
    config = SchedulerConfig(max_batch_size=48, max_tokens_per_step=512)
    shapes = list(step_shapes(config, max_context=1024, free_blocks=512, block_size=16))
    decode_batches = {len(s) for s in shapes if s[0][1] == 1}
    chunks = {s[0][1] for s in shapes if len(s) == 1 and s[0][0] == 0}
    assert decode_batches == {1, 2, 4, 8, 16, 24, 32, 48}
    assert chunks == {16, 32, 64, 128, 256, 512}
    # every sequence takes whole blocks: 24 decodes of 65 tokens need 5 blocks each
    tight = list(step_shapes(config, max_context=256, free_blocks=100, block_size=16))
    assert all(sum(-(-(past + new) // 16) for past, new in s) <= 100 for s in tight)
    assert max(len(s) for s in tight) == 16


def test_calibration_fits_a_tight_cache() -> None:
    """An explicit small cache with a latency target: the engine starts (calibration never
    asks for more blocks than there are)."""
    torch.manual_seed(0)
    model = Transformer(small_config(max_seq_len=256)).eval()
    config = ServeConfig(num_kv_blocks=100, tpot_ms=50, max_batch_size=32)
    engine = Engine(model, config=config)
    assert engine.allocator.used == 0 and engine.scheduler.cost is not None


class SleepingForward:
    """Takes 2 ms + 0.2 ms per token + 2 us per attention key + 0.5 ms per sequence, and
    3 ms more for a step that is not all one-token decodes, on a clock of its own (a real
    sleep overshoots at random on a busy machine: the fit then missed by more than 25%)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def __call__(self, inp: ModelInput) -> torch.Tensor:
        keys = sum(new * (past + new) for _, new, past, _ in inp.sequences)
        seqs = len(inp.sequences)
        mixed = any(new != 1 for _, new, _, _ in inp.sequences)
        self.now += 0.002 + 0.0002 * len(inp.tokens) + 2e-6 * keys + 5e-4 * seqs + 3e-3 * mixed
        return torch.zeros(len(inp.logits_rows), 8)


def test_fit_recovers_a_known_step_time_law(monkeypatch) -> None:
    forward = SleepingForward()
    monkeypatch.setattr(calibrate_module, "time", forward)  # measure() reads its clock
    allocator = BlockAllocator(256, 16)
    config = SchedulerConfig(max_batch_size=32, max_tokens_per_step=256)
    model, samples = calibrate(forward, allocator, config, max_context=512)
    assert len(samples) >= 10 and allocator.used == 0
    # the law exactly, up to the fit's rounding: coefficients within 25% all the same
    assert abs(model.per_token - 2e-4) < 0.25 * 2e-4
    assert abs(model.per_key - 2e-6) < 0.25 * 2e-6
    assert abs(model.per_sequence - 5e-4) < 0.25 * 5e-4
    assert abs(model.per_mixed_step - 3e-3) < 0.25 * 3e-3
    for tokens, keys, seqs, mixed, seconds in samples:
        predicted = model.predict(tokens, keys, seqs, bool(mixed))
        assert abs(predicted - seconds) < 0.25 * seconds + 1e-3


def test_engine_calibrates_when_a_latency_target_is_set() -> None:
    model = Transformer(small_config(max_seq_len=64)).eval()
    plain = Engine(model, config=ServeConfig(num_kv_blocks=32, tpot_ms=0))
    assert plain.scheduler.cost is None
    engine = Engine(model, config=ServeConfig(num_kv_blocks=32, tpot_ms=50, max_batch_size=8))
    cost = engine.scheduler.cost
    assert cost is not None and cost.predict(8, 8 * 33, 8) > 0
    assert engine.allocator.used == 0
    off = Engine(model, config=ServeConfig(num_kv_blocks=32, tpot_ms=50, calibrate=False))
    assert off.scheduler.cost is None
