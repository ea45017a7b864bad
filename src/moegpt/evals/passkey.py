"""Passkey retrieval (Mohtashami & Jaggi, 2023; the YaRN paper's long-context check): a random
5-digit key hidden at a depth of filler text; the model must repeat it when asked.

Prompts are built in token ids, so each one fills its context length exactly: the prompt and
the answer budget together are ``length`` tokens. They run on the serving engine, greedily,
all at once (continuously batched), the way users serve the model. For an instruction-tuned
model the text can travel as one user turn of its chat template (RULER does the same), and
the assistant answers in its own words; either way the first number in the answer must be
the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moegpt.errors import UserError

if TYPE_CHECKING:
    from moegpt.chat import ChatTemplate

INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it.\n"
FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER_TOKENS = 8  # room for the key's digits and a space, whatever the tokenizer
CHAT_QUESTION = " What is the pass key?"
CHAT_ANSWER_TOKENS = 32  # an assistant's sentence around the key ("The pass key is 12345.")
NUMBER = re.compile(r"\d+")


@dataclass
class PasskeyPrompt:
    length: int  # prompt plus answer budget, in tokens
    depth: float  # where the needle sits in the filler, 0 (start) to 1 (end)
    key: str
    token_ids: list[int]


def answer_tokens(chat: bool) -> int:
    """The answer's budget, inside each prompt's length."""
    return CHAT_ANSWER_TOKENS if chat else ANSWER_TOKENS


def build_prompt(
    tokenizer: Any, length: int, depth: float, key: str, template: ChatTemplate | None = None
) -> PasskeyPrompt:
    """The prompt with ``key`` at ``depth``, of ``length`` tokens less the answer's budget;
    with a chat ``template``, one user turn and the assistant's generation prompt."""
    budget = length - answer_tokens(template is not None)
    question = QUESTION if template is None else CHAT_QUESTION
    parts = [tokenizer.encode(text).ids for text in (INTRO, NEEDLE.format(key=key), question)]
    frame = 0 if template is None else len(_as_chat(template, []))
    room = budget - frame - sum(len(part) for part in parts)
    sentence = tokenizer.encode(FILLER).ids
    while True:
        if room < 0:
            raise UserError(f"--lengths: {length} tokens cannot hold the passkey prompt")
        filler = (sentence * (room // len(sentence) + 1))[:room]
        cut = round(depth * room)
        ids = parts[0] + filler[:cut] + parts[1] + filler[cut:] + parts[2]
        if template is None:
            return PasskeyPrompt(length, depth, key, ids)
        # A template encodes its turn's text afresh, so pieces may merge across their seams:
        # shorten the filler by what the joined text gained over the budget.
        ids = _as_chat(template, ids, tokenizer)
        if len(ids) <= budget:
            return PasskeyPrompt(length, depth, key, ids)
        room -= len(ids) - budget


def _as_chat(template: ChatTemplate, ids: list[int], tokenizer: Any = None) -> list[int]:
    """``ids`` (decoded) as the one user turn of a conversation, ready for the answer."""
    text = tokenizer.decode(ids, skip_special_tokens=False) if ids else ""
    return template.encode([{"role": "user", "content": text}], add_generation_prompt=True)


def answered(key: str, text: str) -> bool:
    """Exact match: the first number (run of digits) of the greedy continuation is the key,
    so that 123456 does not pass for 12345."""
    found = NUMBER.search(text)
    return found is not None and found.group() == key


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    trials: int
    correct: list[list[int]]  # [length][depth] trials answered
    examples: list[dict[str, Any]] = field(default_factory=list)  # one wrong answer per cell

    def accuracy(self, i: int, j: int | None = None) -> float:
        """One cell's accuracy, or (``j`` None) one length's over every depth."""
        if j is not None:
            return self.correct[i][j] / self.trials
        return sum(self.correct[i]) / (self.trials * len(self.depths))

    def to_json(self) -> dict[str, Any]:
        return {
            "task": "passkey",
            "lengths": self.lengths,
            "depths": self.depths,
            "trials": self.trials,
            "accuracy": [
                [self.accuracy(i, j) for j in range(len(self.depths))]
                for i in range(len(self.lengths))
            ],
            "accuracy_by_length": {str(n): self.accuracy(i) for i, n in enumerate(self.lengths)},
            "wrong_examples": self.examples,
        }


def run_passkey(
    engine: Any,
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int = 0,
    chat: bool = False,
) -> PasskeyResult:
    """Every (length, depth, trial) prompt through ``engine`` greedily, in one batch; with
    ``chat``, each as a user turn of the engine's chat template."""
    from moegpt.serve.sequence import SamplingParams

    lengths, depths = list(dict.fromkeys(lengths)), list(dict.fromkeys(depths))  # one row each
    context = engine.model.config.max_seq_len
    for length in lengths:
        if length > context:
            raise UserError(
                f"--lengths: {length} exceeds the model's context ({context} tokens, "
                "the answer's included)"
            )
    if engine.tokenizer is None:
        raise UserError("MODEL_DIR: the passkey task needs the model's tokenizer.json")
    template = engine.chat_template if chat else None
    if chat and template is None:
        raise UserError("--chat: the model folder has no chat template (tokenizer_config.json)")
    rng = random.Random(seed)
    prompts = [
        build_prompt(engine.tokenizer, n, d, f"{rng.randrange(10000, 100000)}", template)
        for n in lengths
        for d in depths
        for _ in range(trials)
    ]
    params = SamplingParams(max_tokens=answer_tokens(chat), temperature=0.0)
    outputs = engine.generate([p.token_ids for p in prompts], params)
    correct = [[0] * len(depths) for _ in lengths]
    examples: list[dict[str, Any]] = []
    wrong_cells: set[tuple[int, int]] = set()
    for prompt, [completion] in zip(prompts, outputs, strict=True):
        i, j = lengths.index(prompt.length), depths.index(prompt.depth)
        if answered(prompt.key, completion.text):
            correct[i][j] += 1
        elif (i, j) not in wrong_cells:
            wrong_cells.add((i, j))
            examples.append(
                {
                    "length": prompt.length,
                    "depth": prompt.depth,
                    "key": prompt.key,
                    "answer": completion.text,
                }
            )
    return PasskeyResult(lengths, depths, trials, correct, examples)


def table(result: PasskeyResult) -> str:
    """Accuracy by length (rows) and depth (columns), plus each length's mean."""
    header = "length " + "".join(f"{f'{d:.0%}':>7}" for d in result.depths) + "    all"
    lines = [f"passkey retrieval, {result.trials} trials per cell (greedy, exact match)", header]
    for i, n in enumerate(result.lengths):
        cells = "".join(f"{result.accuracy(i, j):>7.0%}" for j in range(len(result.depths)))
        lines.append(f"{n:>6} {cells}{result.accuracy(i):>7.0%}")
    return "\n".join(lines)
