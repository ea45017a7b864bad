"""Peer check: the engine's greedy continuations of a small Mixtral-shaped model (multi-query,
4 experts top-2), converted with `moegpt convert`, equal Hugging Face `generate`'s."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moegpt.config import ServeConfig
from moegpt.convert import convert
from moegpt.serve.engine import Engine
from moegpt.serve.sequence import SamplingParams
from tests.test_convert import hf_mixtral

transformers = pytest.importorskip("transformers")


def test_greedy_continuations_equal_hugging_face_generate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = hf_mixtral(kv_heads=1)
    reference.generation_config.pad_token_id = 0
    reference.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "moegpt")
    engine = Engine.from_folder(tmp_path / "moegpt", ServeConfig(block_size=4), device="cpu")
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (n,), generator=generator).tolist() for n in (3, 9, 17, 30)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ours = [c[0].token_ids for c in engine.generate(prompts, params)]
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False
            )
        assert got == out[0, len(prompt) :].tolist()
