"""Context extension side by side (the YaRN paper's table): a model pretrained at its
original context, continued at 4x with each rotary scaling, then evaluated at each length.

    python benchmarks/long_context.py --out benchmarks/results                       # CPU
    python benchmarks/long_context.py --base configs/small-moe.toml \
        --long configs/small-moe-long.toml --base-steps 600 --steps 200 --trials 10  # GPU
    python benchmarks/long_context.py --parent runs/smollm2/moegpt --chat \
        --long configs/smollm2-long.toml --steps 60 --variants yarn+long \
        --documents torch:_torch_docs.py --documents torch:_tensor_docs.py  # GPU: 8k -> 32k

Prepares the base recipe's corpus, trains and exports the base recipe once (``--base-steps``
shortens it: "briefly pretrained"), or takes ``--parent``, a model folder trained elsewhere
(SmolLM2-135M-Instruct converted by benchmarks/smollm2.py, pretrained at 8k on 2T tokens),
then for none / linear / ntk / yarn runs the long recipe
with that scaling (its factor from the original context; none keeps the plain rotations),
and yarn once more with long documents upsampled as the recipe has it (yarn+long); exports
each and evaluates it (a finished run is evaluated again, not retrained): passkey retrieval
at the original context, twice it and the extended one (``--chat``: asked through the
model's chat template, for an instruction-tuned parent), and sliding-window perplexity of
held-out long documents at the original and the extended context, beside the parent's at
the original (the short-context regression). The held-out documents are Debian's licence
texts (3.5k and 11k tokens) unless ``--documents`` names others; ``torch:NAME`` is a file of
the installed torch package, whose documentation modules (``_torch_docs.py``, 110k tokens)
no recipe trains on and which every machine with moegpt has. The table also gives the median
training tokens/s of the base run and of each continuation. Everything goes through the `moegpt`
verbs, as a user would run them; the table is printed and saved as JSON and text, as
``long_context-<base>-<steps>steps[-<each --long-set>]-<device>.*`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from verbs import device_tag, median_train_metrics, moegpt, moegpt_streamed, rate, save

from moegpt.config import load_config

# Each continuation: its rotary scaling on the plain mixture, and "yarn+long" as the recipe
# has it, YaRN on data whose documents longer than the original context are read several
# times per epoch (data.long_doc_tokens, data.long_doc_repeat).
PLAIN = "--data.long_doc_tokens=0"
FILE_UNSAFE = re.compile(r"[^\w.-]+")  # in a setting, for the results' file name
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


def evaluate(
    model: Path, lengths: list[int], trials: int, documents: list[str], stride: int, chat: bool
) -> dict:
    texts = [a for doc in documents for a in ("--text", doc)]
    joined = ",".join(str(n) for n in lengths)
    ask = ["--depths", "0,50,100", "--trials", str(trials), *(["--chat"] if chat else [])]
    passkey = json.loads(
        moegpt("eval", str(model), "--task", "passkey", "--lengths", joined, *ask, "--json")
    )
    ppl_lengths = ",".join(str(n) for n in sorted({lengths[0], lengths[-1]}))
    ppl = json.loads(
        moegpt(
            "eval",
            str(model),
            "--task",
            "perplexity",
            "--lengths",
            ppl_lengths,
            "--stride",
            str(stride),
            "--json",
            *texts,
        )
    )
    return {
        "passkey": passkey["accuracy_by_length"],
        # by length x depth, and one wrong answer per cell: where and how retrieval fails
        "passkey_by_depth": passkey["accuracy"],
        "passkey_wrong": passkey["wrong_examples"],
        "perplexity": {str(r["length"]): r["perplexity"] for r in ppl["results"]},
    }


def tokens_per_second(run: Path) -> float | None:
    """The run's median training tokens/s."""
    return median_train_metrics(run, "tokens_per_second")["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="configs/tiny.toml", help="the pretraining recipe")
    parser.add_argument("--long", default="configs/tiny-long.toml", help="the continuation")
    parser.add_argument(
        "--parent",
        metavar="DIR",
        help="extend this model folder instead of pretraining --base (a converted or exported "
        "model)",
    )
    parser.add_argument("--base-steps", type=int, help="pretraining steps (default: recipe's)")
    parser.add_argument("--steps", type=int, default=100, help="continuation steps (100)")
    parser.add_argument("--trials", type=int, default=4, help="passkey prompts per cell (4)")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"continuations to run, comma-separated (default all: {','.join(VARIANTS)}); "
        "fewer fit a GPU call of limited length",
    )
    parser.add_argument(
        "--base-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the pretraining run (repeatable), e.g. train.global_batch_size=64",
    )
    parser.add_argument(
        "--long-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of every continuation (repeatable), e.g. train.global_batch_size=16",
    )
    parser.add_argument(
        "--chat", action="store_true", help="ask the passkey through the chat template"
    )
    parser.add_argument(
        "--documents",
        action="append",
        metavar="FILE",
        help="a held-out long document (repeatable; torch:NAME is a file of the torch "
        "package); default: Debian's GPL-3 and Apache-2.0 licence texts",
    )
    parser.add_argument("--runs", default="runs/long-context", help="run directories go here")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    variants = list(dict.fromkeys(v for v in args.variants.split(",") if v))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants: {', '.join(unknown) or 'none'}; known: {', '.join(VARIANTS)}")
    documents = held_out_documents(args.documents)
    long = load_config(args.long).model
    scaling = long.rope_scaling
    original = scaling.original_max_seq_len or int(long.max_seq_len / scaling.factor)
    # Passkey at the original context, twice it and the extended one (fewer when they meet).
    lengths = sorted({original, min(2 * original, long.max_seq_len), long.max_seq_len})
    stride = original // 2
    runs = Path(args.runs)
    long_settings = [f"--{setting}" for setting in args.long_set]
    started = time.perf_counter()
    # One checkpoint a run, at its end (what export reads): 8 GB each at small-moe's size.
    once = "--checkpoint.every=0"
    if args.parent:  # the long recipe's corpus, in the parent's tokens
        moegpt("prepare", "--config", args.long, *long_settings)
        model = Path(args.parent)
        base, base_steps = "-".join(model.resolve().parts[-2:]), None  # smollm2-moegpt
        lineage = base
    else:
        base, base_steps, model = pretrain(args, runs, once)
        lineage = model.parent.name  # the pretraining run's folder: recipe, steps, settings
    result: dict = {"steps": args.steps, "trials": args.trials, "variants": []}
    result["parent_dir"], result["base_steps"] = args.parent, base_steps
    result["base_settings"], result["long_settings"] = args.base_set, args.long_set
    result["chat"], result["documents"], result["lengths"] = args.chat, documents, lengths
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    # What changes the figures names the file: a rerun with other settings keeps the last.
    settings = "".join("-" + FILE_UNSAFE.sub("_", setting) for setting in args.long_set)
    stem = f"long_context-{base}-{args.steps}steps{settings}-{device_tag()}"

    def save_so_far() -> None:  # a run cut short by a time limit keeps what it measured
        result["seconds"] = time.perf_counter() - started
        save(args.out, stem, result, table(result, base))

    result["parent"] = evaluate(model, lengths[:1], args.trials, documents, stride, args.chat)
    if not args.parent:
        result["parent"]["tokens_per_second"] = tokens_per_second(model.parent)
    save_so_far()
    for variant in variants:
        settings = VARIANTS[variant]
        # Run folders name what made them, so a changed setting never reuses an old run.
        name = "-".join([lineage, Path(args.long).stem, str(args.steps), *args.long_set])
        run = runs / f"{name}-{variant}"
        overrides = [f"--train.init_from={model}", f"--train.steps={args.steps}"]
        overrides += [once, *settings, *long_settings]
        moegpt_streamed("train", "--config", args.long, "--run-dir", str(run), *overrides)
        if not (run / "export" / "model.safetensors").is_file():
            moegpt("export", str(run), str(run / "export"))
        result[variant] = evaluate(
            run / "export", lengths, args.trials, documents, stride, args.chat
        )
        result[variant]["tokens_per_second"] = tokens_per_second(run)
        result["variants"].append(variant)
        save_so_far()


def held_out_documents(names: list[str] | None) -> list[str]:
    """Paths of the held-out documents: ``names`` (``torch:NAME`` inside the torch package),
    else the Debian licence texts that exist here."""
    if not names:
        found = [d for d in DOCUMENTS if Path(d).is_file()]
        if not found:
            raise SystemExit(f"no held-out documents found ({', '.join(DOCUMENTS)})")
        return found
    paths = []
    for name in names:
        path = Path(torch.__file__).parent / name[6:] if name.startswith("torch:") else Path(name)
        if not path.is_file():
            raise SystemExit(f"--documents: {name} not found ({path})")
        paths.append(str(path))
    return paths


def pretrain(args: argparse.Namespace, runs: Path, once: str) -> tuple[str, int, Path]:
    """Prepare, train and export the base recipe (once); its name, steps and model folder."""
    base_recipe = load_config(args.base).train
    steps = args.base_steps or base_recipe.steps
    run = runs / "-".join([Path(args.base).stem, str(steps), *args.base_set])
    moegpt("prepare", "--config", args.base)
    if not (run / "export" / "model.safetensors").is_file():
        brief = []
        if args.base_steps is not None:  # a brief pretraining warms up and decays in its steps
            warmup = min(base_recipe.warmup_steps, max(1, args.base_steps // 10))
            brief = [f"--train.steps={args.base_steps}", f"--train.warmup_steps={warmup}"]
        base_settings = [f"--{setting}" for setting in args.base_set]
        moegpt_streamed(
            "train", "--config", args.base, "--run-dir", str(run), once, *brief, *base_settings
        )
        moegpt("export", str(run), str(run / "export"))
    return Path(args.base).stem, steps, run / "export"


def settings(overrides: list[str] | None) -> str:
    """Settings a run changed from its recipe, for the table's title."""
    return f" with {', '.join(overrides)}" if overrides else ""


def table(result: dict, base: str) -> str:
    """The side-by-side table: passkey at each length, perplexity at the first and last,
    and training tokens/s, a row for the parent and each continuation."""
    lengths = [str(n) for n in result["lengths"]]
    first, last = lengths[0], lengths[-1]

    def row(label: str, cells: list[str]) -> str:
        return f"{label:<10}" + "".join(f"{cell:>14}" for cell in cells)

    parent = result["parent"]
    if result.get("parent_dir"):
        origin = f"{base} (the model folder {result['parent_dir']}, {first}-token context)"
    else:
        origin = (
            f"{base} ({first}-token pretraining, {result['base_steps']} steps"
            f"{settings(result.get('base_settings'))})"
        )
    asked = " through the chat template" if result.get("chat") else ""
    lines = [
        f"{origin} continued {result['steps']} steps at {last} "
        f"tokens{settings(result.get('long_settings'))} on {result['device']}; passkey "
        f"{result['trials']} trials x 3 depths per length{asked}; perplexity of "
        f"{len(result['documents'])} held-out documents",
        row(
            "scaling",
            [f"passkey@{n}" for n in lengths] + [f"ppl@{first}", f"ppl@{last}", "tokens/s"],
        ),
        row(
            "parent",
            [f"{parent['passkey'][first]:.0%}"]
            + ["-"] * (len(lengths) - 1)
            + [f"{parent['perplexity'][first]:.2f}", "-", rate(parent.get("tokens_per_second"))],
        ),
    ]
    for variant in result.get("variants", VARIANTS):
        r = result[variant]
        passkey = [f"{r['passkey'][n]:.0%}" for n in lengths]
        ppl = [f"{r['perplexity'][first]:.2f}", f"{r['perplexity'][last]:.2f}"]
        lines.append(row(variant, passkey + ppl + [rate(r.get("tokens_per_second"))]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
