"""Both vision stages of a recipe pair (configs/tiny-vision*.toml on CPU by default), end to
end, and which start of the Flamingo stage is better: its image encoder trained from scratch
inside it (scratch), pretrained by the CLIP stage (a) and then frozen (clip), or pretrained
by the CLIP stage and trained on inside the Flamingo stage (clip-tuned).

For each, the Flamingo stage's report: each source's held-out caption loss before (gates
closed: the language model alone) and after, after again with each row given another row's
images (how much of the gain needs the right image), `moegpt eval --task transcribe`
(character error rate on held-out rendered lines) and `--task classify` (0- and 4-shot
accuracy on held-out Fashion-MNIST canvases) of its export, the gates' values, and the time
it took; for the CLIP stage, its held-out contrastive loss before and after.

    moegpt quickstart --run-dir runs/tiny               # exports runs/tiny/export, the parent
    python benchmarks/tiny_vision.py --out benchmarks/results           # both starts
    python benchmarks/tiny_vision.py --starts clip                      # stage (a), then (b)
    python benchmarks/tiny_vision.py --config configs/small-moe-vision.toml \
        --clip-config configs/small-moe-vision-clip.toml --text-parent runs/small-moe/export \
        --run-dir runs/small-moe-vision --starts scratch,clip,clip-tuned --concurrent \
        --eval-items 1000                                               # GPU: small-moe's eyes

``--concurrent`` runs the Flamingo stages at once, sharing the device: they are small enough
that one alone leaves most of a GPU idle, but their tokens/s and MFU are then not each one's
own (the report says so).

Results: ``vision_stages-<recipe>-<device>.json`` and ``.txt`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from verbs import device_tag, median_train_metrics, moegpt, moegpt_streamed, rate, save

from moegpt.config import WORD_LINES_CORPUS, load_config
from moegpt.data.mixture import IGNORE_INDEX, Mixture, MixtureLoader
from moegpt.evals.vision import gate_values, per_class_line
from moegpt.train.trainer import Trainer, lm_loss_sum


def held_out_loss(
    config_path: str, run_dir: Path, resume: bool, overrides: Sequence[str] = ()
) -> tuple[dict, Trainer]:
    """Per-source held-out loss of the run's newest checkpoint (``resume``), or of the model
    the stage starts from."""
    trainer = Trainer(load_config(config_path, overrides), run_dir, log=lambda m: None)
    trainer.prepare(resume=resume)
    return trainer.evaluate(), trainer


@torch.no_grad()
def image_dependence(trainer: Trainer, source: str) -> dict[str, float]:
    """Held-out caption loss of ``source`` with each row's own images, and with each row
    given the previous row's images instead (blank where that row had fewer), over the same
    batches at the training's precision: what the loss gains from the right image is the
    difference. Single-row batches have no other row and are left out of both."""
    config = trainer.config
    mixture = Mixture.open(config.data, split="val", source=source)
    loader = MixtureLoader(mixture, config.train.micro_batch_size, document_mask=True)
    model = trainer.parts.models[0].eval()
    sums = {"own": 0.0, "swapped": 0.0}
    count = 0
    for batch in loader:
        if len(batch["input_ids"]) < 2:
            continue
        batch = {name: tensor.to(trainer.device) for name, tensor in batch.items()}
        for key, images in (("own", batch["images"]), ("swapped", batch["images"].roll(1, 0))):
            with trainer.autocast():
                out = model(
                    batch["input_ids"],
                    images,
                    positions=batch["positions"],
                    document_ids=batch["document_ids"],
                )
            sums[key] += float(lm_loss_sum(out.logits.float(), batch["labels"]))
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    if not count:
        raise SystemExit(f"{source}: no held-out batch of two rows or more to swap images in")
    return {key: total / count for key, total in sums.items()}


def free_device_memory() -> None:
    """Give dropped trainers' GPU memory back to the device (gc: a trainer's pipeline loss
    refers back to it): each stage trains in a child process, outside this one's caching
    allocator, beside its concurrent siblings."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def flamingo_stage(
    args: argparse.Namespace,
    run_dir: str,
    overrides: list[str],
    progress: Callable[[dict], None],
) -> None:
    """Train, evaluate and export the Flamingo stage with ``overrides`` to its recipe;
    ``progress`` takes its results so far after training and after each evaluation."""
    with tempfile.TemporaryDirectory() as tmp:
        before, _ = held_out_loss(args.config, Path(tmp) / "start", False, overrides)
    free_device_memory()
    began = time.perf_counter()
    moegpt_streamed("train", "--config", args.config, "--run-dir", run_dir, *overrides)
    trained = time.perf_counter() - began
    after, trainer = held_out_loss(args.config, Path(run_dir), True, overrides)
    sources = [s.name for s in trainer.config.data.sources]
    result = {
        "steps": trainer.config.train.steps,
        "frozen": list(trainer.config.train.freeze),
        "before": before,
        "after": after,
        "gates": gate_values(trainer.parts.models[0]),
        "image_dependence": {s: image_dependence(trainer, s) for s in sources},
        "train_seconds": trained,
        **median_train_metrics(Path(run_dir), "tokens_per_second", "mfu"),
    }
    del trainer
    free_device_memory()
    progress(dict(result))
    export = Path(run_dir) / "export"
    moegpt("export", run_dir, str(export), "--force")
    began = time.perf_counter()
    common = ["--config", args.config, "--limit", str(args.eval_items), "--json"]
    tasks = [("transcribe", "transcribe", []), ("classify", "classify", [])]
    if any(s.path == WORD_LINES_CORPUS for s in load_config(args.config).data.sources):
        tasks.insert(1, ("transcribe_words", "transcribe", ["--lines", "words"]))
    for key, task, extra in tasks:
        found = moegpt("eval", str(export), "--task", task, *common, *extra)
        result[key] = json.loads(found)[task]
        result["eval_seconds"] = time.perf_counter() - began
        progress(dict(result))


def clip_stage(args: argparse.Namespace) -> dict:
    """Train and export the CLIP stage; its held-out contrastive loss before and after."""
    run_dir = Path(args.run_dir + "-clip")
    with tempfile.TemporaryDirectory() as tmp:
        before, _ = held_out_loss(args.clip_config, Path(tmp) / "start", resume=False)
    free_device_memory()
    began = time.perf_counter()
    moegpt_streamed("train", "--config", args.clip_config, "--run-dir", str(run_dir))
    trained = time.perf_counter() - began
    after, trainer = held_out_loss(args.clip_config, run_dir, resume=True)
    steps = trainer.config.train.steps
    del trainer
    free_device_memory()
    moegpt("export", str(run_dir), str(run_dir / "export"), "--force")
    return {
        "steps": steps,
        "before": before,
        "after": after,
        "train_seconds": trained,
        "export": str(run_dir / "export"),
    }


def mfu(result: dict) -> str:
    """The stage's median MFU, or n/a (CPU: no known peak)."""
    return "n/a" if result.get("mfu") is None else f"{result['mfu']:.1%}"


def stage_lines(name: str, result: dict) -> list[str]:
    sources = sorted({k.split("/")[0] for k in result["before"]})
    lines = [
        f"{name}: {result['steps']} steps, frozen {', '.join(result['frozen'])} "
        f"(train {result['train_seconds']:.0f} s, eval {result.get('eval_seconds', 0):.0f} s; "
        f"{rate(result.get('tokens_per_second'))} tokens/s, MFU {mfu(result)})",
        "  held-out caption loss   " + "  ".join(f"{s:>9}" for s in sources),
    ]
    for label, scores in (("before (gates closed)", result["before"]), ("after", result["after"])):
        cells = "  ".join(f"{scores[f'{s}/loss']:>9.3f}" for s in sources)
        lines.append(f"  {label:<23} {cells}")
    paired = result["image_dependence"]
    for key, label in (("own", "after, whole split"), ("swapped", "  images swapped")):
        cells = "  ".join(f"{paired[s][key]:>9.3f}" for s in sources)
        lines.append(f"  {label:<23} {cells}")
    for key, what in (("transcribe", "lines"), ("transcribe_words", "word lines")):
        if found := result.get(key):
            lines.append(
                f"  transcribe: character error rate {found['character_error_rate']:.1%} over "
                f"{found['lines']} held-out {what} ({found['exact_match']:.1%} exact)"
            )
    for shots in result.get("classify", []):
        lines.append(
            f"  classify, {shots['shots']}-shot: accuracy {shots['accuracy']:.1%} over "
            f"{shots['items']} held-out items (chance 10%); by class: "
            + per_class_line(shots["per_class"])
        )
    gates = result["gates"]
    lines.append(
        "  gates, tanh (attention / ffn) before each layer: "
        + ", ".join(f"{k}: {g['attention']:+.3f} / {g['ffn']:+.3f}" for k, g in gates.items())
    )
    return lines


# Each start of the Flamingo stage: its parent (the text model, or the CLIP stage's export),
# what it freezes, its run folder's suffix and its report's title.
STARTS = {
    "scratch": ("text", "lm.*", "", "Flamingo stage, encoder from scratch"),
    "clip": ("clip", "lm.*,encoder.*", "-from-clip", "Flamingo stage, encoder from the CLIP stage"),
    "clip-tuned": (
        "clip",
        "lm.*",
        "-from-clip-tuned",
        "Flamingo stage, encoder from the CLIP stage and trained on",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny-vision.toml", help="stage (b)")
    parser.add_argument("--clip-config", default="configs/tiny-vision-clip.toml", help="stage (a)")
    parser.add_argument(
        "--starts",
        default="scratch,clip",
        help="the Flamingo stage's encoder, comma-separated: scratch (trained inside it), clip "
        "(stage (a) first, then frozen), clip-tuned (stage (a) first, then trained on)",
    )
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="run the Flamingo stages at once on the one device (tokens/s and MFU are shared)",
    )
    parser.add_argument("--run-dir", default="runs/tiny-vision")
    parser.add_argument(
        "--text-parent", default="runs/tiny/export", help="the language model (quickstart's)"
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--eval-items", type=int, default=200, help="held-out items per task")
    args = parser.parse_args()
    starts = list(dict.fromkeys(s for s in args.starts.split(",") if s))
    if unknown := set(starts) - set(STARTS):
        raise SystemExit(f"--starts: unknown {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    moegpt("prepare", "--config", args.config)
    result: dict = {"config": args.config, "prepare_seconds": time.perf_counter() - started}
    result["concurrent"] = args.concurrent
    lines: list[str] = []
    parents = {"text": args.text_parent}
    if any(STARTS[start][0] == "clip" for start in starts):
        result["clip_stage"] = clip_stage(args)
        clip = result["clip_stage"]
        parents["clip"] = clip["export"]
        sources = sorted({k.split("/")[0] for k in clip["before"]})
        lines.append(
            f"CLIP stage ({args.clip_config}): {clip['steps']} steps, train "
            f"{clip['train_seconds']:.0f} s; held-out contrastive loss per image "
            + ", ".join(
                f"{s} {clip['before'][f'{s}/loss']:.3f} -> {clip['after'][f'{s}/loss']:.3f} "
                f"(chance {clip['after'][f'{s}/chance']:.3f})"
                for s in sources
            )
        )

    tag = device_tag()
    saving = threading.Lock()  # concurrent stages report as they go

    def report() -> None:
        """Save what has been measured so far: a run cut short keeps its finished parts."""
        with saving:
            result["seconds"] = time.perf_counter() - started
            table = [f"vision stages of {args.config} on {tag} ({result['seconds']:.0f} s)"]
            table += lines
            for start in (s for s in starts if s in result):
                concurrently = " (stages run concurrently)" if args.concurrent else ""
                table += stage_lines(STARTS[start][3] + concurrently, result[start])
            stem = f"vision_stages-{Path(args.config).stem}-{tag}"
            save(args.out, stem, result, "\n".join(table))

    def run(start: str) -> None:
        parent, frozen, suffix, _ = STARTS[start]
        overrides = ["--train.init_from", parents[parent], "--train.freeze", frozen]

        def progress(found: dict) -> None:
            with saving:
                result[start] = found
            report()

        flamingo_stage(args, args.run_dir + suffix, overrides, progress)

    if "clip_stage" in result:
        report()
    with ThreadPoolExecutor(max_workers=len(starts) if args.concurrent else 1) as pool:
        for stage in [pool.submit(run, start) for start in starts]:
            try:
                stage.result()
            except BaseException:  # a stage's failure: queued stages would only delay it
                pool.shutdown(wait=False, cancel_futures=True)
                raise


if __name__ == "__main__":
    main()
