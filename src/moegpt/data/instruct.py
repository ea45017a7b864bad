"""An instruction set built from the local Python installation (the built-in chat corpus
``stdlib:instruct``): questions about the standard library's public functions with exact
answers taken from their source, so a tuned model can be scored by exact match.

- module: "Which module of the Python standard library defines `X`?" (names defined by
  exactly one module) -> ``json.decoder``
- signature: "What is the signature of `mod.f`?" -> ``f(a, b=1)``
- summary: "Summarise `mod.f` in one line." -> the first line of its docstring

Every question about a module carries that module's corpus key (``stdlib/<path>``, as
``stdlib:code`` and ``stdlib:text`` do), so the validation split holds whole modules out:
their questions are never tuned on, and with the split's ``exclude_below`` their code and
docstrings are not pre-trained on either in the same recipe; a parent pretrained by another
recipe kept them out too if it held out at least as large a share with the same seed.
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

KINDS = ("module", "signature", "summary")
MAX_ANSWER_CHARS = 120  # long answers teach little and score nothing


@dataclass(frozen=True)
class Instruction:
    key: str  # the module's corpus key: questions about a module are held out together
    kind: str
    question: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.answer},
        ]


def module_name(relative: Path) -> str:
    """``json/decoder.py`` -> ``json.decoder``; a package's ``__init__.py`` is the package."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def public_functions(source: str) -> list[ast.FunctionDef]:
    """A module's top-level public functions that have a docstring."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    return [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and not node.name.startswith("_")
        and ast.get_docstring(node)
    ]


def function_instructions(key: str, module: str, node: ast.FunctionDef) -> list[Instruction]:
    """The signature and summary questions about one function."""
    out = []
    signature = f"{node.name}({ast.unparse(node.args)})"
    if len(signature) <= MAX_ANSWER_CHARS:
        question = f"What is the signature of `{module}.{node.name}`?"
        out.append(Instruction(key, "signature", question, signature))
    summary = (ast.get_docstring(node) or "").strip().splitlines()[0].strip()
    if summary and len(summary) <= MAX_ANSWER_CHARS:
        question = f"Summarise `{module}.{node.name}` in one line."
        out.append(Instruction(key, "summary", question, summary))
    return out


def build_instructions(modules: list[tuple[str, str, str]]) -> list[Instruction]:
    """Instructions about ``(key, module name, source)`` modules, in a fixed order."""
    found = [
        (key, module, public_functions(source))
        for key, module, source in modules
        if not any(part.startswith("_") for part in module.split("."))  # public modules only
    ]
    defined = Counter(f.name for _, _, functions in found for f in functions)
    out: list[Instruction] = []
    for key, module, functions in found:
        for node in functions:
            if defined[node.name] == 1:
                question = f"Which module of the Python standard library defines `{node.name}`?"
                out.append(Instruction(key, "module", question, module))
            out += function_instructions(key, module, node)
    return out


def to_document(instruction: Instruction) -> str:
    """The corpus document of an instruction: its conversation as JSON."""
    return json.dumps(instruction.messages(), ensure_ascii=False)
