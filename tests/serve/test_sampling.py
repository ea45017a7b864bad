"""Sampling: the distribution each request samples from, seeds, stops, log-probabilities,
n > 1 samples sharing their prompt's blocks; and `moegpt generate`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moegpt.cli import main
from moegpt.config import ServeConfig
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.serve.engine import Engine
from moegpt.serve.sampler import distribution, sample
from moegpt.serve.sequence import SamplingParams
from moegpt.weights import save_model
from tests.conftest import small_config


def test_distribution_applies_temperature_top_k_and_top_p() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    plain = distribution(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(plain, (logits / 0.5).softmax(0))
    top2 = distribution(logits, SamplingParams(top_k=2))
    assert torch.allclose(top2[:2], logits[:2].softmax(0)) and top2[2:].sum() == 0
    p = logits.softmax(0)  # 0.55, 0.20, 0.12, ...: the nucleus for 0.7 is the first two
    nucleus = distribution(logits, SamplingParams(top_p=0.7))
    assert torch.allclose(nucleus[:2], p[:2] / p[:2].sum()) and nucleus[2:].sum() == 0
    greedy = distribution(logits, SamplingParams(temperature=0))
    assert greedy.tolist() == [1.0, 0, 0, 0, 0]


def test_samples_follow_the_distribution() -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 0.3])
    params = SamplingParams(temperature=0.7, top_p=0.9)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(20000):
        counts[sample(logits, params, generator).token] += 1
    expected = distribution(logits, params) * 20000
    # chi-square with 3 dof: 16.3 is the 0.1% tail
    mask = expected > 0
    chi2 = ((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum()
    assert chi2 < 16.3 and counts[~mask].sum() == 0


def test_logprobs_are_the_model_distribution() -> None:
    logits = torch.randn(50)
    drawn = sample(logits, SamplingParams(temperature=0, logprobs=3), None)
    reference = logits.log_softmax(0)
    assert drawn.token == int(logits.argmax())
    assert drawn.logprob == pytest.approx(float(reference.max()))
    assert [t for t, _ in drawn.top] == reference.topk(3).indices.tolist()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"n": 0}, "n"),
        ({"logprobs": 99}, "logprobs"),
    ],
)
def test_bad_sampling_parameters_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(UserError, match=f"^{field}: "):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(small_config(max_seq_len=64)).eval()


def test_seeded_requests_reproduce_and_n_samples_share_the_prompt(model: Transformer) -> None:
    engine = Engine(model, config=ServeConfig(block_size=4, num_kv_blocks=64))
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=3)
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks and a partial one
    rid = engine.add_request(prompt, params)
    engine.step()  # prefill and fork: the 4 prompt blocks are shared by all three samples
    assert engine.allocator.used == 4
    first = engine.generate([prompt], params)[0]  # meanwhile a second identical request
    while engine.has_work():
        engine.step()
    again = Engine(model, config=ServeConfig(block_size=4, num_kv_blocks=64)).generate(
        [prompt], params
    )[0]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first}) > 1  # different seeds per sample
    assert engine.allocator.used == 0 and rid


def test_stop_tokens_and_max_tokens(model: Transformer) -> None:
    engine = Engine(model, config=ServeConfig(num_kv_blocks=32))
    greedy = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0))[0][0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 10
    stop_at = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_at)
    stopped = engine.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop_at,))
    )[0][0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy.token_ids[:first]


def test_prompts_are_checked(model: Transformer) -> None:
    engine = Engine(model, config=ServeConfig(num_kv_blocks=32))
    with pytest.raises(UserError, match="^prompt: 64 tokens leave no room"):
        engine.add_request([1] * 64)
    with pytest.raises(UserError, match="^prompt: token ids must be in 0..96"):
        engine.add_request([1, 97])
    with pytest.raises(UserError, match="^prompt: text needs a tokenizer"):
        engine.add_request("hello")


def test_a_sequence_longer_than_the_cache_stops_at_its_capacity(model: Transformer) -> None:
    engine = Engine(model, config=ServeConfig(block_size=4, num_kv_blocks=5))  # 20 tokens
    with pytest.raises(UserError, match="^prompt: 20 tokens leave no room in the 20-token KV"):
        engine.add_request([1] * 20)
    done = engine.generate([[1] * 6], SamplingParams(max_tokens=30, temperature=0))[0][0]
    assert done.finish_reason == "length" and len(done.token_ids) == 14
    assert engine.allocator.used == 0


def test_generate_cli_streams_tokens(tmp_path: Path, model: Transformer, capsys) -> None:
    save_model(model, tmp_path / "m")
    stdin_free = ["generate", str(tmp_path / "m"), "--prompt", "x"]
    assert main(stdin_free) == 2  # text without a tokenizer: a one-line error
    assert "prompt: text needs a tokenizer" in capsys.readouterr().err
