"""`moegpt quickstart`: the whole life of a small model in one command, on CPU.

Prepare the bundled corpus (the interpreter's own standard library), train the tiny recipe,
evaluate it on held-out text against the corpus's unigram entropy, export a serving
checkpoint and print samples.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from moegpt.config import Config
from moegpt.console import stdout
from moegpt.data.prepare import prepare
from moegpt.data.shards import SplitTokens
from moegpt.data.tokenizer import END_OF_TEXT, load_tokenizer
from moegpt.generate import generate
from moegpt.train.export import export
from moegpt.train.trainer import Trainer
from moegpt.weights import load

PROMPTS = ("def fibonacci(n):\n", "import os\n\nclass ", "The ")


def unigram_entropy(splits: list[SplitTokens], vocab_size: int) -> float:
    """Entropy (nats/token) of the token frequencies of ``splits``: the loss of the best model
    that ignores context."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for split in splits:
        for tokens, _ in split.shards:
            counts += np.bincount(np.asarray(tokens), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def quickstart(config: Config, run_dir: Path, steps: int | None = None) -> dict[str, float]:
    if steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))
    stdout.rule("1. prepare the bundled corpus")
    prepare(config)
    stdout.rule(f"2. train {config.model.n_experts}-expert MoE for {config.train.steps} steps")
    trainer = Trainer(config, run_dir)
    trainer.run()
    stdout.rule("3. evaluate on held-out documents")
    scores = trainer.evaluate()
    vocab = config.model.vocab_size
    for source, split in zip(config.data.sources, trainer.mixture.splits, strict=True):
        loss = scores[f"{source.name}/loss"]
        entropy = unigram_entropy([split], vocab)
        scores[f"{source.name}/unigram_entropy"] = entropy
        stdout.print(
            f"{source.name}: held-out loss {loss:.3f} nats/token (perplexity {math.exp(loss):.1f}) "
            f"against a unigram entropy of {entropy:.3f} (perplexity {math.exp(entropy):.1f})",
            highlight=False,
        )
    stdout.rule("4. export a serving checkpoint")
    out = export(run_dir, run_dir / "export", overwrite=True)
    stdout.rule("5. samples")
    model = load(out)
    tokenizer = load_tokenizer(out / "tokenizer.json")
    stop = tokenizer.token_to_id(END_OF_TEXT)
    for i, prompt in enumerate(PROMPTS):
        ids = generate(model, tokenizer.encode(prompt).ids, 60, seed=i, stop_id=stop)
        stdout.print(prompt + tokenizer.decode(ids), markup=False, highlight=False)
        stdout.rule(style="dim")
    return scores
