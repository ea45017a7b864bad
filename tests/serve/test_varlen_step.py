"""The GPU's eager step (every sequence in one variable-length FlashAttention call per layer)
packs rows, slots and offsets so that each sequence attends to exactly its own keys.

FlashAttention has no CPU kernel, so the kernel is replaced by a reference written from its
documented contract (``tests/serve/flash_reference.py``); what is tested is the packing around
it, against the per-sequence path (one SDPA call per sequence over its own slots)."""

from __future__ import annotations

import pytest
import torch

from moegpt.model import Transformer
from moegpt.serve import paged, runner
from moegpt.serve.paged import PagedKVCache
from moegpt.serve.runner import ModelForward, ModelInput
from tests.conftest import small_config
from tests.serve.flash_reference import reference_flash

BLOCK = 4


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config(max_seq_len=64)).eval()


def forward_for(model: Transformer, batch_invariant: bool) -> ModelForward:
    cache = PagedKVCache(model.config, 32, BLOCK, torch.float32, torch.device("cpu"))
    return ModelForward(model, cache, torch.device("cpu"), batch_invariant=batch_invariant)


def mixed_steps() -> list[ModelInput]:
    """A first step of three prompts, then one mixing a decode, a chunk after a cached prefix
    and a fresh prompt, each sequence in blocks that are not consecutive."""
    tables = [[7, 2, 9], [0, 5, 6], [3, 11, 4], [12, 1, 8]]
    first, second = ModelInput(), ModelInput()
    for row, (blocks, prompt) in enumerate(
        zip(tables, ([5, 6, 7, 8, 9], [11, 12], [3, 1, 4, 1, 5, 9, 2]), strict=False)
    ):
        first.add_sequence(len(prompt), 0, row, blocks)
        first.tokens += prompt
        first.positions += range(len(prompt))
        first.logits_rows += range(len(first.tokens) - len(prompt), len(first.tokens))
    for row, past, new in ((0, 5, [20]), (2, 7, [21, 22, 23]), (3, 0, [4, 4, 2])):
        offset = len(second.tokens)
        second.add_sequence(len(new), past, row, tables[row])
        second.tokens += new
        second.positions += range(past, past + len(new))
        second.logits_rows += range(offset, offset + len(new))
    return [first, second]


def test_one_varlen_call_equals_attention_per_sequence(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_sequence = forward_for(model, batch_invariant=True)
    expected = [per_sequence(inp) for inp in mixed_steps()]

    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return reference_flash(*args, **kwargs)

    monkeypatch.setattr(runner, "flash_applies", lambda cache: True)
    monkeypatch.setattr(paged, "flash_varlen", counted)
    varlen = forward_for(model, batch_invariant=False)
    for inp, want in zip(mixed_steps(), expected, strict=True):
        torch.testing.assert_close(varlen(inp), want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 * model.config.n_layers  # one call per layer and step


def test_the_batch_invariant_mode_never_takes_the_varlen_path(
    model: Transformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "flash_applies", lambda cache: True)
    monkeypatch.setattr(paged, "flash_varlen", lambda *a, **k: pytest.fail("varlen ran"))
    forward_for(model, batch_invariant=True)(mixed_steps()[0])
