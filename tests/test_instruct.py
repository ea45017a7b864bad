"""The standard-library instruction set: exact answers from the source, whole modules held
out, and `moegpt eval --task instruct` scoring exact matches by kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moegpt.chat import CHATML_TEMPLATE, ChatTemplate
from moegpt.config import load_config
from moegpt.data.instruct import build_instructions
from moegpt.data.prepare import split_documents
from moegpt.errors import UserError
from moegpt.evals.instruct import held_out, run_instruct
from moegpt.serve.engine import Completion, folder_tokenizer
from tests.serve.conftest import export_model

SOURCE = '''
def loads(s, *, cls=None, **kw):
    """Deserialize s to a Python object.

    More text."""

def dumps(obj):
    """Serialize obj."""

def _private(x):
    """Hidden."""

def undocumented(x):
    pass
'''


def test_questions_and_answers_come_from_the_source() -> None:
    other = 'def loads(x):\n    """Another loads."""\n'
    modules = [("stdlib/json/__init__.py", "json", SOURCE), ("stdlib/a.py", "a", other)]
    out = {(i.kind, i.question): i for i in build_instructions(modules)}
    assert out["signature", "What is the signature of `json.loads`?"].answer == (
        "loads(s, *, cls=None, **kw)"
    )
    assert out["summary", "Summarise `json.loads` in one line."].answer == (
        "Deserialize s to a Python object."
    )
    # dumps is defined only by json; loads by both: no module question about it
    module = [i for i in out.values() if i.kind == "module"]
    assert [(i.question, i.answer) for i in module] == [
        ("Which module of the Python standard library defines `dumps`?", "json")
    ]
    assert not any("_private" in q or "undocumented" in q for _, q in out)
    assert {i.key for i in out.values()} == {"stdlib/json/__init__.py", "stdlib/a.py"}
    assert build_instructions([("stdlib/_x.py", "_x", SOURCE)]) == []  # private modules


def test_held_out_questions_are_whole_modules_of_the_recipes_split(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[data]\npacking = "documents"\ndocument_mask = true\n'
        '[[data.sources]]\nname = "i"\nkind = "chat"\npath = "stdlib:instruct"\n'
        "val_fraction = 0.3\n"
    )
    modules = [(f"stdlib/m{k}.py", f"m{k}", SOURCE) for k in range(20)]
    instructions = build_instructions(modules)
    config = load_config(recipe)
    kept = held_out(instructions, config)
    _, val = split_documents([i.key for i in instructions], 0.3, 0.3, config.data.seed)
    assert kept == [instructions[j] for j in val] and 0 < len(kept) < len(instructions)
    keys = {i.key for i in kept}
    assert all((i.key in keys) == (i in kept) for i in instructions)  # whole modules
    with pytest.raises(UserError, match="^--config: the recipe has no stdlib:instruct source"):
        held_out(instructions, load_config())


def test_exact_match_by_kind_through_a_stand_in_engine(tmp_path: Path) -> None:
    """An engine that answers right except for summaries: 100% / 100% / 0%."""
    folder = export_model(tmp_path)
    tokenizer, _ = folder_tokenizer(folder)
    template = ChatTemplate(CHATML_TEMPLATE, tokenizer)
    instructions = build_instructions([(f"stdlib/m{k}.py", f"m{k}", SOURCE) for k in range(3)])
    answers = {i.question: i.answer for i in instructions}

    class Oracle:
        chat_template = template

        def generate(self, prompts: list[list[int]], params: object) -> list:
            out = []
            for ids in prompts:
                question = tokenizer.decode(ids).split("user\n")[1].split("\n")[0]
                right = answers[question]
                out.append(
                    [Completion([], "wrong" if "Summarise" in question else f" {right}\n", "stop")]
                )
            return out

    result = run_instruct(Oracle(), instructions, limit=100, seed=0)
    assert result.accuracy("signature") == 1.0 and result.accuracy("summary") == 0.0
    assert result.total["summary"] == 6 and len(result.examples) == 1  # loads, dumps x 3
    assert json.loads(json.dumps(result.to_json()))["by_kind"]["summary"]["questions"] == 6
    assert run_instruct(Oracle(), instructions, limit=4, seed=0).accuracy() >= 0  # a sample
    assert sum(run_instruct(Oracle(), instructions, limit=4, seed=0).total.values()) == 4


def test_answer_losses_equal_the_models_teacher_forced_loss(tmp_path: Path) -> None:
    """Each reference answer's loss through the engine's prompt scoring equals the model's
    own: the mean of -log p over the tokens the chat template marks for training (the
    answer and its end of turn), computed here from one plain forward a conversation."""
    import torch

    import moegpt
    from moegpt.config import ServeConfig
    from moegpt.evals.instruct import answer_losses
    from moegpt.serve.engine import Engine

    folder = export_model(tmp_path, max_seq_len=256)
    instructions = build_instructions([("stdlib/m.py", "m", SOURCE)])[:4]
    with Engine.from_folder(folder, ServeConfig(max_batch_size=2)) as engine:
        losses = answer_losses(engine, instructions)
        template = engine.chat_template
    model = moegpt.load(folder)
    for instruction, loss in zip(instructions, losses, strict=True):
        encoded = template.encode_with_labels(
            [
                {"role": "user", "content": instruction.question},
                {"role": "assistant", "content": instruction.answer},
            ]
        )
        ids = torch.tensor([encoded.ids])
        with torch.no_grad():
            logprobs = model(ids).logits[0].log_softmax(-1)
        places = [p for p, trained in enumerate(encoded.labels) if trained]
        expected = -sum(float(logprobs[p - 1, encoded.ids[p]]) for p in places) / len(places)
        assert loss == pytest.approx(expected, rel=1e-4)
    assert len(set(losses)) == len(losses)  # four different answers
