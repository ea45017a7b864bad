"""Passkey answers of moegpt's serving engine against Hugging Face transformers, prompt by prompt.

`moegpt eval --task passkey` runs on the serving engine (paged cache, chunked prefill, CUDA
graphs). When a model fails to retrieve a key, is it the model or the engine? This script
exports the model folder to Hugging Face's format (`moegpt convert --to llama`, or `mixtral`
for an MoE model), asks both the same prompts greedily (the engine all at once, as `moegpt
eval` does; transformers one prompt at a time with its SDPA attention, bf16 on a GPU) and
prints each side's accuracy per cell, and how many answers name the same number.

    python benchmarks/passkey_reference.py --model runs/long/export --chat \\
        --lengths 8192,16384,32768 --depths 0,50,100 --trials 3 --out benchmarks/results
    python benchmarks/passkey_reference.py \\
        --model runs/long-context/tiny-300-tiny-long-100-yarn/export --lengths 512,1024  # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moegpt.convert import convert
from moegpt.evals.passkey import NUMBER, PasskeyResult, run_passkey
from moegpt.serve.engine import Completion, Engine


class Recorded:
    """An engine whose ``generate`` keeps each prompt's completion and the seconds it took
    (everything else is the engine's own), so that two engines' answers can be compared
    prompt by prompt and their times alike (loading and start-up left out of both)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.completions: list[Completion] = []
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompts: list[list[int]], params: Any) -> list[list[Completion]]:
        started = time.perf_counter()
        outputs = self._engine.generate(prompts, params)
        self.seconds += time.perf_counter() - started
        self.completions += [completion for [completion] in outputs]
        return outputs


@dataclass
class Prompting:
    """What both sides share to build the same prompts: the moegpt folder's tokenizer, chat
    template and end-of-text id, and ``model.config`` (the context length)."""

    tokenizer: Any
    chat_template: Any
    eos_id: int | None
    model: Any


class TransformersEngine:
    """What :func:`run_passkey` asks of an engine, answered by a transformers causal LM:
    greedy ``generate`` one prompt at a time, stopping at the end-of-text id as the engine
    does. The tokenizer and chat template are the moegpt engine's, so the prompts are the
    same token ids."""

    def __init__(self, folder: Path, like: Prompting, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.hf = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation="sdpa"
        ).to(device)
        self.hf.eval()
        self.device = device
        self.model = like.model  # run_passkey reads the context length from its config
        self.tokenizer = like.tokenizer
        self.chat_template = like.chat_template
        self.eos = like.eos_id

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: Any) -> list[list[Completion]]:
        outputs = []
        for ids in prompts:
            tokens = torch.tensor([ids], device=self.device)
            out = self.hf.generate(
                tokens,
                attention_mask=torch.ones_like(tokens),
                max_new_tokens=params.max_tokens,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.eos if self.eos is not None else 0,
            )
            new = out[0, len(ids) :].tolist()
            if self.eos is not None and self.eos in new:
                new = new[: new.index(self.eos)]
            text = self.tokenizer.decode(new)
            outputs.append(
                [Completion(new, text, "stop" if len(new) < params.max_tokens else "length")]
            )
        return outputs


def first_number(text: str) -> str | None:
    found = NUMBER.search(text)
    return found.group() if found else None


def cells(result: PasskeyResult) -> list[list[float]]:
    return [
        [result.accuracy(i, j) for j in range(len(result.depths))]
        for i in range(len(result.lengths))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an exported moegpt model folder")
    parser.add_argument("--lengths", default="8192,16384", help="prompt lengths in tokens")
    parser.add_argument("--depths", default="0,50,100", help="needle depths in percent")
    parser.add_argument("--trials", type=int, default=3, help="prompts per cell")
    parser.add_argument("--seed", type=int, default=0, help="the keys' seed (moegpt eval's)")
    parser.add_argument("--chat", action="store_true", help="prompts as a chat turn")
    parser.add_argument("--out", help="write passkey_reference-<model>.json here")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    depths = [int(d) / 100 for d in args.depths.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    engine = Engine.from_folder(args.model)
    ours_engine = Recorded(engine)
    ours = run_passkey(ours_engine, lengths, depths, args.trials, args.seed, args.chat)
    config = types.SimpleNamespace(config=engine.model.config)  # the config, not the weights
    like = Prompting(engine.tokenizer, engine.chat_template, engine.eos_id, config)
    # The engine's cache and graphs would leave transformers little room at 32k: free them.
    engine.close()
    del engine, ours_engine._engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert(Path(args.model), Path(tmp) / "hf")
        arch = json.loads((folder / "config.json").read_text())["model_type"]
        reference = Recorded(TransformersEngine(folder, like, device))
        theirs = run_passkey(reference, lengths, depths, args.trials, args.seed, args.chat)
    moegpt_seconds, hf_seconds = ours_engine.seconds, reference.seconds

    pairs = list(zip(ours_engine.completions, reference.completions, strict=True))
    same_number = sum(first_number(a.text) == first_number(b.text) for a, b in pairs)
    same_tokens = sum(a.token_ids == b.token_ids for a, b in pairs)
    name = Path(args.model).resolve().parent.name
    print(
        f"passkey on {name} ({device.type}): moegpt's engine against transformers {arch} "
        f"(SDPA), {args.trials} prompts per cell, greedy"
    )
    print("length  depth   moegpt  transformers")
    for i, length in enumerate(ours.lengths):
        for j, depth in enumerate(ours.depths):
            print(
                f"{length:>6} {depth:>6.0%} {ours.accuracy(i, j):>8.0%} "
                f"{theirs.accuracy(i, j):>13.0%}"
            )
    print(
        f"same first number in {same_number}/{len(pairs)} answers, the same tokens in "
        f"{same_tokens}/{len(pairs)} (generating: engine {moegpt_seconds:.0f} s, "
        f"transformers {hf_seconds:.0f} s)"
    )
    if args.out:
        path = Path(args.out) / f"passkey_reference-{name}-{device.type}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "model": args.model,
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "reference": f"transformers {arch}, SDPA",
            "lengths": ours.lengths,
            "depths": ours.depths,
            "trials": args.trials,
            "chat": args.chat,
            "moegpt": cells(ours),
            "transformers": cells(theirs),
            "same_first_number": same_number,
            "same_tokens": same_tokens,
            "answers": [{"moegpt": a.text, "transformers": b.text} for a, b in pairs],
        }
        path.write_text(json.dumps(record, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
