"""Context extension side by side (the YaRN paper's table, at the sizes a CPU runs): the
quick-start model, trained at 256 tokens, continued at 1,024 with each rotary scaling.

    python benchmarks/long_context.py --out benchmarks/results

Prepares the bundled corpus, trains and exports configs/tiny.toml once (runs/tiny), then for
none / linear / ntk / yarn runs configs/tiny-long.toml with that scaling (factor 4 from 256
tokens; none keeps the plain rotations), and yarn once more with long documents upsampled
(yarn+long); exports each and evaluates it (a finished run is evaluated again, not
retrained): passkey retrieval at each length and sliding-window perplexity of held-out long
documents at 256 and 1,024 tokens, beside the parent's perplexity at 256 (the short-context
regression). Everything goes through
the `moegpt` verbs, as a user would run them; the table is printed and saved as JSON and text.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from verbs import moegpt, save

# Each continuation: its rotary scaling on the plain mixture, and "yarn+long" as the recipe
# has it, YaRN on data whose documents longer than the original 256 tokens are read 4 times
# per epoch (data.long_doc_tokens).
PLAIN = "--data.long_doc_tokens=0"
VARIANTS = {
    "none": ["--model.rope_scaling.type=none", "--model.rope_scaling.factor=1", PLAIN],
    "linear": ["--model.rope_scaling.type=linear", PLAIN],
    "ntk": ["--model.rope_scaling.type=ntk", PLAIN],
    "yarn": ["--model.rope_scaling.type=yarn", PLAIN],
    "yarn+long": ["--model.rope_scaling.type=yarn"],
}
# Held-out long documents: licence texts that ship with Debian, which the stdlib corpus the
# model trains on does not contain.
DOCUMENTS = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0")


def evaluate(model: Path, lengths: str, trials: int, documents: list[str]) -> dict:
    texts = [a for doc in documents for a in ("--text", doc)]
    passkey = json.loads(
        moegpt(
            "eval",
            str(model),
            "--task",
            "passkey",
            "--lengths",
            lengths,
            "--depths",
            "0,50,100",
            "--trials",
            str(trials),
            "--json",
        )
    )
    ppl_lengths = "256" if lengths == "256" else "256,1024"
    ppl = json.loads(
        moegpt(
            "eval",
            str(model),
            "--task",
            "perplexity",
            "--lengths",
            ppl_lengths,
            "--stride",
            "128",
            "--json",
            *texts,
        )
    )
    return {
        "passkey": passkey["accuracy_by_length"],
        "perplexity": {str(r["length"]): r["perplexity"] for r in ppl["results"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/long-context", help="run directories go here")
    parser.add_argument("--steps", type=int, default=100, help="continuation steps (100)")
    parser.add_argument("--trials", type=int, default=4, help="passkey prompts per cell (4)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    documents = [d for d in DOCUMENTS if Path(d).is_file()]
    if not documents:
        raise SystemExit(f"no held-out documents found ({', '.join(DOCUMENTS)})")
    runs = Path(args.runs)
    parent = runs / "tiny"
    started = time.perf_counter()
    moegpt("prepare", "--config", "configs/tiny.toml")
    if not (parent / "export" / "model.safetensors").is_file():
        moegpt("train", "--config", "configs/tiny.toml", "--run-dir", str(parent))
        moegpt("export", str(parent), str(parent / "export"))
    result = {"parent": evaluate(parent / "export", "256", args.trials, documents)}
    result["documents"] = documents
    for scaling, settings in VARIANTS.items():
        run = runs / f"tiny-long-{scaling}"
        overrides = [f"--train.init_from={parent / 'export'}", f"--train.steps={args.steps}"]
        overrides += settings
        moegpt("train", "--config", "configs/tiny-long.toml", "--run-dir", str(run), *overrides)
        if not (run / "export" / "model.safetensors").is_file():
            moegpt("export", str(run), str(run / "export"))
        result[scaling] = evaluate(run / "export", "256,512,1024", args.trials, documents)
        print(f"{scaling}: {result[scaling]}", flush=True)
    result["seconds"] = time.perf_counter() - started
    result["steps"], result["trials"] = args.steps, args.trials

    lines = [
        f"tiny (256-token pretraining) continued {args.steps} steps at 1,024 tokens; passkey "
        f"{args.trials} trials x 3 depths per length; perplexity of {len(documents)} held-out "
        "documents, stride 128",
        "scaling    passkey@256  @512  @1024   ppl@256  ppl@1024",
        f"parent     {result['parent']['passkey']['256']:>10.0%}     -      -  "
        f"{result['parent']['perplexity']['256']:>8.2f}         -",
    ]
    for scaling in VARIANTS:
        r = result[scaling]
        p, q = r["passkey"], r["perplexity"]
        lines.append(
            f"{scaling:<9}  {p['256']:>10.0%} {p['512']:>5.0%} {p['1024']:>6.0%}  "
            f"{q['256']:>8.2f}  {q['1024']:>8.2f}"
        )
    save(args.out, "long_context-tiny-cpu", result, "\n".join(lines))


if __name__ == "__main__":
    main()
