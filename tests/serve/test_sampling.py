"""Sampling: the distribution each request samples from, seeds, stops, log-probabilities,
n > 1 samples sharing their prompt's blocks; and `moegpt generate`."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

from moegpt.cli import main
from moegpt.config import ServeConfig
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.serve.engine import Engine
from moegpt.serve.sampler import batch_distribution, distribution, sample_batch
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


MIXED = [
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=0.5, top_k=40, top_p=0.5),
    SamplingParams(top_p=0.999),
    SamplingParams(),
]


def test_batch_distribution_equals_each_row_alone() -> None:
    logits = torch.randn(len(MIXED), 50) * 3
    batched = batch_distribution(logits, MIXED)
    for row, original, params in zip(batched, logits, MIXED, strict=True):
        assert torch.allclose(row, distribution(original, params), atol=1e-6)


def test_a_vanishing_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0], [3.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=1e-40), SamplingParams(temperature=1e-300, top_p=0.5)]
    assert all(p.greedy for p in params)
    probs = batch_distribution(logits, params)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert not SamplingParams(temperature=1e-3).greedy


def test_samples_follow_the_distribution() -> None:
    """Every row of a mixed batch draws from its own distribution (chi-square)."""
    logits = torch.tensor([[1.0, 0.0, -0.5, 0.3, -2.0]] * len(MIXED))
    draws = 4000
    counts = torch.zeros(len(MIXED), 5)
    for _ in range(draws):
        for i, drawn in enumerate(sample_batch(logits, MIXED, [None] * len(MIXED))):
            counts[i, drawn.token] += 1
    expected = batch_distribution(logits, MIXED) * draws
    for i in range(len(MIXED)):
        mask = expected[i] > 0
        chi2 = ((counts[i, mask] - expected[i, mask]) ** 2 / expected[i, mask]).sum()
        # chi-square with at most 4 dof: 18.5 is the 0.1% tail
        assert chi2 < 18.5 and counts[i, ~mask].sum() == 0, (i, counts[i], expected[i])


def test_a_seeded_row_draws_the_same_whatever_the_batch() -> None:
    logits = torch.randn(4, 30)
    params = [SamplingParams(seed=7)] + [SamplingParams()] * 3

    def first_tokens(rows: int) -> list[int]:
        generator = torch.Generator().manual_seed(7)
        gens = [generator] + [None] * (rows - 1)
        return [sample_batch(logits[:rows], params[:rows], gens)[0].token for _ in range(20)]

    assert first_tokens(1) == first_tokens(4)


def test_logprobs_are_the_model_distribution() -> None:
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(),
        SamplingParams(temperature=0, logprobs=0),
    ]
    drawn = sample_batch(logits, params, [None] * 3)
    reference = logits.log_softmax(-1)
    assert drawn[0].token == int(logits[0].argmax())
    assert drawn[0].logprob == pytest.approx(float(reference[0].max()))
    assert [t for t, _ in drawn[0].top] == reference[0].topk(3).indices.tolist()
    assert [v for _, v in drawn[0].top] == pytest.approx(reference[0].topk(3).values.tolist())
    assert drawn[1].logprob is None and drawn[1].top is None
    assert drawn[2].logprob == pytest.approx(float(reference[2].max())) and drawn[2].top == []


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
    assert "no tokenizer.json, so text cannot become tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-tokens", "0"], "--max-tokens: must be >= 1"),
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--n", "0"], "--n: must be >= 1"),
        (["--stop", ""], "--stop: stop strings must not be empty"),
    ],
)
def test_generate_cli_names_a_bad_sampling_flag_before_loading(
    tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    missing = tmp_path / "not-a-model"  # never opened: the flags are checked first
    assert main(["generate", str(missing), "--prompt", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "not-a-model" not in err and len(err.strip().splitlines()) == 1


def test_generate_cli_says_how_the_engine_started(text_model: Path, capsys) -> None:
    flags = ["--max-tokens", "4", "--temperature", "0", "--num-kv-blocks", "32"]
    assert main(["generate", str(text_model), "--prompt", "def", *flags]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("engine: "))
    assert re.fullmatch(
        r"engine: KV cache 32 blocks of 16 tokens \([\d.,]+ MiB\), no decode graphs, "
        r"no step-time model, overlap off; ready in [\d.]+ s",
        line,
    ), line


def test_generate_cli_drops_the_newline_that_ends_a_piped_prompt(
    text_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moegpt.serve.engine import folder_tokenizer

    seen: list[list[int]] = []
    real = Engine.add_request

    def recording(self, ids, *args, **kwargs):
        seen.append(list(ids))
        return real(self, ids, *args, **kwargs)

    monkeypatch.setattr(Engine, "add_request", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("def foo(\n"))
    assert main(["generate", str(text_model), "--max-tokens", "1", "--num-kv-blocks", "32"]) == 0
    tokenizer, _ = folder_tokenizer(text_model)
    assert seen == [tokenizer.encode("def foo(").ids]
