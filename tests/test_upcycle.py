"""`moegpt upcycle`: a dense model as an MoE of copies of its feed-forward layers computes what
the dense model computes (fp32, 1e-5), then trains on the MoE path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moegpt
from moegpt.cli import main
from moegpt.errors import UserError
from moegpt.upcycle import upcycle, upcycle_model
from tests.conftest import small_config


@pytest.fixture
def dense_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    dense = moegpt.Transformer(small_config(n_experts=0, n_layers=3))
    folder = moegpt.save_model(dense, tmp_path / "dense")
    (folder / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    return folder


@pytest.mark.parametrize(("experts", "top_k"), [(4, 2), (8, 1), (3, 3)])
def test_upcycled_logits_equal_the_dense_models(dense_folder: Path, tmp_path, experts, top_k):
    dst = tmp_path / f"moe-{experts}-{top_k}"
    assert (
        main(
            [
                "upcycle",
                str(dense_folder),
                str(dst),
                "--experts",
                str(experts),
                "--top-k",
                str(top_k),
            ]
        )
        == 0
    )
    dense, moe = moegpt.load(dense_folder), moegpt.load(dst)
    assert (moe.config.n_experts, moe.config.top_k) == (experts, top_k)
    assert moe.num_params().total > dense.num_params().total
    tokens = torch.randint(0, dense.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens).logits, dense(tokens).logits, rtol=1e-5, atol=1e-5)
        # In float64, where rounding cannot hide a difference, they agree to its precision.
        moe64, dense64 = moe.double()(tokens).logits, dense.double()(tokens).logits
        torch.testing.assert_close(moe64, dense64, rtol=0, atol=1e-12)
    meta = json.loads((dst / "config.json").read_text())
    assert meta["parent"]["upcycled"] == {
        "experts": experts,
        "top_k": top_k,
        "noise": 0.0,
        "seed": 0,
    }
    assert (dst / "tokenizer_config.json").read_text() == '{"chat_template": "x"}'


def test_noise_breaks_the_symmetry_and_the_router_trains(dense_folder: Path) -> None:
    dense = moegpt.load(dense_folder)
    moe = upcycle_model(dense, experts=4, top_k=2, noise=1e-2, seed=1)
    w1 = moe.layers["0"].ffn.experts.w1
    assert not torch.equal(w1[0], w1[1])
    tokens = torch.randint(0, dense.config.vocab_size, (2, 24))
    with torch.no_grad():
        gap = (moe(tokens).logits - dense(tokens).logits).abs().max()
    assert 0 < gap < 1.0  # close to the dense model, not equal
    moe.train()
    out = moe(tokens)
    (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
    gate = moe.layers["0"].ffn.router.gate.weight.grad
    assert gate is not None and gate.abs().sum() > 0


def test_bad_upcycles_are_one_line(dense_folder: Path, tmp_path: Path) -> None:
    moe = upcycle(dense_folder, tmp_path / "moe", experts=4, top_k=2)
    with pytest.raises(UserError, match="already a Mixture-of-Experts"):
        upcycle(moe, tmp_path / "again", experts=4, top_k=2)
    with pytest.raises(UserError, match="^--top-k: must be in 1..4"):
        upcycle(dense_folder, tmp_path / "bad", experts=4, top_k=5)
    with pytest.raises(UserError, match="^--experts: an MoE needs at least 2"):
        upcycle(dense_folder, tmp_path / "bad", experts=1, top_k=1)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "again").exists()


def test_the_dense_original_drafts_for_its_upcycled_model(dense_folder: Path, tmp_path) -> None:
    """Speculative serving with the dense parent as the draft: the output is the upcycled
    model's own greedy output, and a draft that computes what the target computes has its
    proposals accepted."""
    from moegpt.config import ServeConfig
    from moegpt.serve.engine import Engine
    from moegpt.serve.sequence import SamplingParams

    moe = moegpt.load(upcycle(dense_folder, tmp_path / "moe", experts=4, top_k=2))
    dense = moegpt.load(dense_folder)
    prompts = [[5, 9, 2, 7] * 3, [1, 2, 3], [40, 41, 42, 43, 44]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    config = ServeConfig(num_kv_blocks=64, block_size=4)
    alone = Engine(moe, config=config).generate(prompts, params)
    engine = Engine(moe, config=ServeConfig(num_kv_blocks=64, block_size=4), draft=dense)
    drafted = engine.generate(prompts, params)
    assert [c[0].token_ids for c in drafted] == [c[0].token_ids for c in alone]
    spec = engine.stats.spec
    assert spec.proposed > 0 and spec.acceptance_rate > 0.9


def test_the_upcycled_model_trains_from_the_dense_function(tmp_path: Path) -> None:
    """In training mode too: a dense recipe's capacity_factor (meaningless for it) does not
    make the experts drop tokens."""
    torch.manual_seed(0)
    dense = moegpt.Transformer(small_config(n_experts=0, n_layers=2, capacity_factor=1.0))
    moe = upcycle_model(dense, experts=4, top_k=2)
    assert moe.config.capacity_factor == 0.0
    tokens = torch.randint(0, dense.config.vocab_size, (4, 32))
    dense.train(), moe.train()
    torch.testing.assert_close(moe(tokens).logits, dense(tokens).logits, rtol=1e-5, atol=1e-5)
