"""`moegpt eval`: passkey prompts fill their lengths exactly with the key at its depth, answers
are scored by exact match, the CLI runs on the serving engine and writes JSON and a heatmap;
sliding-window perplexity equals direct forwards where windows do not overlap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import moegpt
from moegpt.cli import main
from moegpt.config import ServeConfig
from moegpt.errors import UserError
from moegpt.evals.passkey import (
    ANSWER_TOKENS,
    CHAT_ANSWER_TOKENS,
    answered,
    build_prompt,
    run_passkey,
)
from moegpt.evals.perplexity import Windows, perplexity
from moegpt.serve.engine import Completion, Engine, folder_tokenizer
from tests.serve.conftest import export_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_model(tmp_path_factory.mktemp("eval"), max_seq_len=256)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompts_fill_their_length_with_the_key_at_its_depth(
    model_dir: Path, depth: float
) -> None:
    tokenizer, _ = folder_tokenizer(model_dir)
    prompt = build_prompt(tokenizer, 200, depth, "31415")
    assert len(prompt.token_ids) == 200 - ANSWER_TOKENS
    text = tokenizer.decode(prompt.token_ids)
    assert text.count("31415") == 2 and text.rstrip().endswith("The pass key is")
    before = text.index("The pass key is 31415")
    filler = text.count("The grass is green")
    assert text[:before].count("The grass is green") == round(depth * filler) or 0 < depth < 1
    if depth == 0.0:
        assert "grass" not in text[:before]
    if depth == 1.0:
        assert "grass" not in text[before:]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_chat_passkey_prompts_are_one_user_turn_within_their_length(
    model_dir: Path, depth: float
) -> None:
    """With the folder's chat template the text is one user turn, rendered as the template
    renders it, followed by the assistant's generation prompt; prompt and the longer answer
    budget fit the length."""
    engine = Engine.from_folder(model_dir, ServeConfig(calibrate=False), device="cpu")
    template, tokenizer = engine.chat_template, engine.tokenizer
    prompt = build_prompt(tokenizer, 220, depth, "27182", template)
    assert 220 - CHAT_ANSWER_TOKENS - 3 <= len(prompt.token_ids) <= 220 - CHAT_ANSWER_TOKENS
    text = tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
    content = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert text.endswith("<|im_start|>assistant\n")
    assert content.startswith("There is an important pass key") and content.count("27182") == 2
    assert content.endswith("What is the pass key?")
    rendered = template.encode([{"role": "user", "content": content}], add_generation_prompt=True)
    assert rendered == prompt.token_ids


def test_chat_passkey_needs_a_chat_template(model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    engine = Engine.from_folder(bare, ServeConfig(calibrate=False), device="cpu")
    with pytest.raises(UserError, match="^--chat: the model folder has no chat template"):
        run_passkey(engine, [160], [0.5], trials=1, chat=True)


def test_answers_are_exact_matches() -> None:
    assert answered("31415", " 31415.")
    assert not answered("31415", " 31416. 31415")  # the first key-shaped answer counts
    assert not answered("31415", " three one four")
    assert not answered("31415", " 314159")  # a longer number is not the key
    assert not answered("31415", " 7 then 31415")  # the first number is the answer


def test_repeated_lengths_and_depths_count_once(model_dir: Path) -> None:
    engine = Engine.from_folder(model_dir, ServeConfig(calibrate=False), device="cpu")
    result = run_passkey(engine, [160, 160], [0.5, 0.5], trials=2)
    assert result.lengths == [160] and result.depths == [0.5]
    assert all(0 <= cell <= 1 for row in result.to_json()["accuracy"] for cell in row)


def test_passkey_cli_reports_json_and_a_heatmap(model_dir: Path, tmp_path: Path, capsys) -> None:
    plot = tmp_path / "heat.png"
    args = ["eval", str(model_dir), "--task", "passkey", "--lengths", "160,256"]
    args += ["--depths", "0,50,100", "--trials", "2", "--json", "--plot", str(plot)]
    assert main(args) in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["lengths"] == [160, 256] and out["depths"] == [0.0, 0.5, 1.0]
    assert len(out["accuracy"]) == 2 and all(len(row) == 3 for row in out["accuracy"])
    assert all(0 <= a <= 1 for row in out["accuracy"] for a in row)
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 3 * 50


def test_lengths_past_the_context_fail_in_one_line(model_dir: Path, capsys) -> None:
    code = main(["eval", str(model_dir), "--task", "passkey", "--lengths", "128,512"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith(
        "moegpt: error: --lengths: 512 exceeds the model's context"
    )


def test_a_document_with_nothing_to_score_fails_in_one_line(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["eval", str(model_dir), "--task", "perplexity", "--text", str(empty)])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code != 0
        and err[-1] == f"moegpt: error: --text: {empty} holds 0 tokens; it needs 2 or more"
    )


def test_eval_runs_the_engine_with_serve_overrides(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """``--serve.KEY=VALUE`` reaches the engine (here: prefill in chunks of 24 tokens), the
    figures do not change with it, and a bad value is refused in one line."""
    doc = tmp_path / "doc.txt"
    doc.write_text("def f(x):\n    return x + 1\n" * 20)
    seen: list[ServeConfig] = []
    opened = Engine.from_folder
    monkeypatch.setattr(
        Engine, "from_folder", lambda path, config: seen.append(config) or opened(path, config)
    )
    args = ["eval", str(model_dir), "--task", "perplexity", "--text", str(doc), "--lengths", "96"]
    results = []
    for extra in ([], ["--serve.max_tokens_per_step=24"]):
        assert main([*args, "--json", *extra]) in (0, None)
        results.append(json.loads(capsys.readouterr().out)["results"][0])
    assert [c.max_tokens_per_step for c in seen] == [ServeConfig().max_tokens_per_step, 24]
    assert results[1]["tokens"] == results[0]["tokens"]
    assert results[1]["perplexity"] == pytest.approx(results[0]["perplexity"], rel=1e-5)
    assert main([*args, "--serve.max_tokens_per_step=0"]) != 0
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("moegpt: error: serve.max_tokens_per_step")
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lengths", "1"], "--lengths: a window of 1 token scores nothing; use 2 or more"),
        (["--lengths", "64", "--stride", "-5"], "--stride: must be positive, got -5"),
    ],
)
def test_perplexity_windows_that_score_nothing_are_refused(
    model_dir: Path, tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("def f(x):\n    return x + 1\n" * 20)
    assert main(["eval", str(model_dir), "--task", "perplexity", "--text", str(doc), *flags]) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"moegpt: error: {message}"


def test_an_instruct_recipe_holding_out_nothing_is_one_line(model_dir: Path, capsys) -> None:
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-sft.toml")
    args = ["eval", str(model_dir), "--task", "instruct", "--config", recipe]
    assert main([*args, "--data.sources.0.val_fraction=0"]) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"moegpt: error: --config: {recipe} holds out no stdlib:instruct questions"
    )


def test_windows_score_every_token_once() -> None:
    for n, length, stride in [(10, 4, 2), (10, 4, 3), (3, 8, 4), (17, 5, 3)]:
        spans = Windows.of(n, length, stride).spans
        scored = [p for _, end, first in spans for p in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - start <= length and first > start for start, end, first in spans)
    disjoint = Windows.of(10, 4, 4).spans  # each chunk's first token has no context
    assert [p for _, end, first in disjoint for p in range(first, end)] == [1, 2, 3, 5, 6, 7, 9]


@pytest.mark.parametrize("serve", [{}, {"max_tokens_per_step": 50, "block_size": 8}])
def test_perplexity_through_the_engine_equals_direct_forwards(model_dir: Path, serve) -> None:
    """Windows batched through the serving engine (prefill chunked or not) against one
    no-cache forward per window."""
    model = moegpt.load(model_dir)
    engine = Engine(model, config=ServeConfig(num_kv_blocks=128, calibrate=False, **serve))
    torch.manual_seed(0)
    doc = torch.randint(0, model.config.vocab_size, (120,)).tolist()
    other = torch.randint(0, model.config.vocab_size, (40,)).tolist()

    def nll(tokens: list[int]) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0]
        return float(F.cross_entropy(logits[:-1], torch.tensor(tokens[1:]), reduction="sum"))

    got, scored = perplexity(engine, [doc], length=128, stride=64)  # one window: the whole doc
    assert scored == 119 and got == pytest.approx(math.exp(nll(doc) / 119), rel=1e-5)
    got, scored = perplexity(engine, [doc, other], length=60, stride=60)  # independent chunks
    want = math.exp((nll(doc[:60]) + nll(doc[60:]) + nll(other)) / 157)
    assert scored == 157 and got == pytest.approx(want, rel=1e-5)
    got, scored = perplexity(engine, [model_context(model)], length=256, stride=256)
    assert scored == 255  # a window may fill the whole context: it draws nothing
    assert engine.allocator.used == 0


def model_context(model) -> list[int]:
    """A document exactly as long as the model's context."""
    return torch.randint(0, model.config.vocab_size, (model.config.max_seq_len,)).tolist()


def test_passkey_cells_count_the_right_answers(model_dir: Path) -> None:
    """A stand-in engine that reads the key out of each prompt, except at one depth: that
    depth's column is 0%, every other cell 100%."""
    tokenizer, _ = folder_tokenizer(model_dir)

    class Reader:
        model = moegpt.load(model_dir)

        def __init__(self) -> None:
            self.tokenizer = tokenizer

        def generate(self, prompts: list[list[int]], params: object) -> list:
            outputs = []
            for ids in prompts:
                text = tokenizer.decode(ids)
                key = text.split("The pass key is ")[1][:5]
                blind = text.split(f"{key} is the pass key.")[1].startswith(" What")  # at 100%
                outputs.append([Completion([], " 00000" if blind else f" {key}.", "length")])
            return outputs

    result = run_passkey(Reader(), [160, 256], [0.0, 0.5, 1.0], trials=3, seed=1)
    assert result.correct == [[3, 3, 0], [3, 3, 0]]
    assert result.accuracy(0) == pytest.approx(2 / 3)
    assert {e["depth"] for e in result.examples} == {1.0}
