"""Held-out exact match on the standard-library instruction set (``moegpt eval --task
instruct``): the questions about modules that the recipe's validation split holds out,
answered greedily through the serving engine with the model's own chat template; and each
reference answer's loss under the model, teacher-forced, a graded measure beside exact
match's all or nothing."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from moegpt.config import Config
from moegpt.data.instruct import KINDS, Instruction
from moegpt.data.prepare import split_documents
from moegpt.errors import UserError
from moegpt.serve.engine import Engine
from moegpt.serve.sequence import SamplingParams

SOURCE_PATH = "stdlib:instruct"
ANSWER_TOKENS = 64


def held_out(instructions: list[Instruction], config: Config) -> list[Instruction]:
    """The instructions the recipe's validation split holds out (whole modules), exactly as
    `moegpt prepare` splits its ``stdlib:instruct`` source."""
    data = config.data
    sources = [s for s in data.sources if s.path == SOURCE_PATH]
    if not sources:
        raise UserError(
            f"--config: the recipe has no {SOURCE_PATH} source to take the held-out modules from"
        )
    exclude_below = data.exclude_below
    _, val = split_documents(
        [i.key for i in instructions], sources[0].val_fraction, exclude_below, data.seed
    )
    return [instructions[j] for j in val]


@dataclass
class InstructResult:
    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: list[dict[str, str]] = field(default_factory=list)  # a wrong answer per kind
    answer_loss: list[float] = field(default_factory=list)  # nats a token, per question asked

    def accuracy(self, kind: str | None = None) -> float:
        kinds = [kind] if kind else list(KINDS)
        total = sum(self.total[k] for k in kinds)
        return sum(self.correct[k] for k in kinds) / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "task": "instruct",
            "accuracy": self.accuracy(),
            "by_kind": {
                k: {"accuracy": self.accuracy(k), "questions": self.total[k]} for k in KINDS
            },
            "wrong_examples": self.examples,
            **(
                {
                    "answer_loss": sum(self.answer_loss) / len(self.answer_loss),
                    "answer_loss_per_question": self.answer_loss,
                }
                if self.answer_loss
                else {}
            ),
        }


def run_instruct(
    engine: Engine,
    instructions: list[Instruction],
    limit: int,
    seed: int,
    score_answers: bool = False,
) -> InstructResult:
    """Exact match (whitespace-stripped) of greedy answers to up to ``limit`` of
    ``instructions`` (a seeded sample), all batched through the engine; with
    ``score_answers`` also each reference answer's loss (:func:`answer_losses`)."""
    template = engine.chat_template
    if template is None:
        raise UserError("MODEL_DIR: the instruct task needs the model's chat template")
    chosen = instructions
    if len(chosen) > limit:
        chosen = random.Random(seed).sample(instructions, limit)
    prompts = [
        template.encode([{"role": "user", "content": i.question}], add_generation_prompt=True)
        for i in chosen
    ]
    params = SamplingParams(
        max_tokens=ANSWER_TOKENS, temperature=0, stop_token_ids=template.end_of_turn_ids()
    )
    result = InstructResult()
    wrong_kinds = set()
    for instruction, (completion,) in zip(chosen, engine.generate(prompts, params), strict=True):
        result.total[instruction.kind] += 1
        if completion.text.strip() == instruction.answer.strip():
            result.correct[instruction.kind] += 1
        elif instruction.kind not in wrong_kinds:
            wrong_kinds.add(instruction.kind)
            result.examples.append(
                {
                    "question": instruction.question,
                    "answer": instruction.answer,
                    "got": completion.text,
                }
            )
    if score_answers:
        result.answer_loss = answer_losses(engine, chosen)
    return result


def answer_losses(engine: Engine, instructions: list[Instruction]) -> list[float]:
    """Each reference answer's mean negative log-likelihood a token under the model,
    teacher-forced after its question: the tokens instruction tuning trains on (the answer
    and its end of turn, as the chat template marks them), scored by the engine's prompt
    log-probabilities in one batched pass. Two models compare question by question."""
    template = engine.chat_template
    if template is None:
        raise UserError("MODEL_DIR: the instruct task needs the model's chat template")
    params = SamplingParams(max_tokens=0, prompt_logprobs=True)
    answers: dict[str, tuple[int, list[int]]] = {}  # request id -> (question, labelled places)
    for i, instruction in enumerate(instructions):
        encoded = template.encode_with_labels(
            [
                {"role": "user", "content": instruction.question},
                {"role": "assistant", "content": instruction.answer},
            ]
        )
        places = [p for p, trained in enumerate(encoded.labels) if trained]
        answers[engine.add_request(encoded.ids, params)] = (i, places)
    losses = [0.0] * len(instructions)
    while engine.has_work():
        for out in engine.step():
            if out.prompt_logprobs is not None:  # [None, log p(token 1 | 0), ...]
                i, places = answers.pop(out.request_id)
                losses[i] = -sum(out.prompt_logprobs[p] for p in places) / len(places)
    return losses
