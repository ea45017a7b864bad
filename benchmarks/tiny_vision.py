"""The Flamingo stage of configs/tiny-vision.toml on CPU, end to end: prepare the image-text
sources, train vision on the frozen quick-start model, and report each source's held-out
caption loss before (gates closed: the language model alone) and after, after again with
each row given another row's images (how much of the gain needs the right image), then
export the run and evaluate it with `moegpt eval --task transcribe` (character error rate on
held-out rendered lines) and `--task classify` (0- and 4-shot accuracy on held-out
Fashion-MNIST canvases), the gates' values, and the time it all took.

    moegpt quickstart                                   # exports runs/tiny/export, the parent
    python benchmarks/tiny_vision.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from verbs import moegpt, save

from moegpt.config import load_config
from moegpt.data.mixture import IGNORE_INDEX, Mixture, MixtureLoader
from moegpt.evals.vision import gate_values
from moegpt.train.trainer import Trainer, lm_loss_sum


def held_out_loss(config_path: str, run_dir: Path, resume: bool) -> tuple[dict, Trainer]:
    """Per-source held-out loss of the run's newest checkpoint (``resume``), or of the model
    the stage starts from."""
    trainer = Trainer(load_config(config_path), run_dir, log=lambda m: None)
    trainer.prepare(resume=resume)
    return trainer.evaluate(), trainer


@torch.no_grad()
def caption_loss(trainer: Trainer, source: str, swap_images: bool) -> float:
    """Mean held-out caption loss of ``source``; with ``swap_images`` each row gets the next
    row's images (the same count of them where it can), so what the loss gains from the
    right image shows up as the difference."""
    config = trainer.config
    mixture = Mixture.open(config.data, split="val", source=source)
    loader = MixtureLoader(mixture, config.train.micro_batch_size, document_mask=True)
    model = trainer.parts.models[0].eval()
    total = count = 0.0
    for batch in loader:
        images = batch["images"]
        if swap_images:
            images = torch.roll(images, 1, dims=0)
        out = model(
            batch["input_ids"],
            images,
            positions=batch["positions"],
            document_ids=batch["document_ids"],
        )
        total += float(lm_loss_sum(out.logits, batch["labels"]))
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny-vision.toml")
    parser.add_argument("--run-dir", default="runs/tiny-vision")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--eval-items", type=int, default=200, help="held-out items per task")
    args = parser.parse_args()
    started = time.perf_counter()
    moegpt("prepare", "--config", args.config)
    prepared = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        before, _ = held_out_loss(args.config, Path(tmp) / "start", resume=False)
    began = time.perf_counter()
    moegpt("train", "--config", args.config, "--run-dir", args.run_dir)
    trained = time.perf_counter() - began
    after, trainer = held_out_loss(args.config, Path(args.run_dir), resume=True)
    gates = gate_values(trainer.parts.models[0])
    sources = [s.name for s in trainer.config.data.sources]
    swapped = {s: caption_loss(trainer, s, swap_images=True) for s in sources}
    export = Path(args.run_dir) / "export"
    moegpt("export", args.run_dir, str(export), "--force")
    evaluated = time.perf_counter()
    common = ["--config", args.config, "--limit", str(args.eval_items), "--json"]
    transcribed = json.loads(moegpt("eval", str(export), "--task", "transcribe", *common))
    classified = json.loads(moegpt("eval", str(export), "--task", "classify", *common))
    evaluated = time.perf_counter() - evaluated
    result = {
        "config": args.config,
        "steps": trainer.config.train.steps,
        "before": before,
        "after": after,
        "gates": gates,
        "after_with_other_rows_images": swapped,
        "transcribe": transcribed["transcribe"],
        "classify": classified["classify"],
        "eval_seconds": evaluated,
        "prepare_seconds": prepared,
        "train_seconds": trained,
        "seconds": time.perf_counter() - started,
    }
    lines = [
        f"{args.config}: the Flamingo stage on CPU, {result['steps']} steps "
        f"(prepare {prepared:.0f} s, train {trained:.0f} s, all {result['seconds']:.0f} s)",
        "held-out caption loss   " + "  ".join(f"{s:>9}" for s in sources),
    ]
    for name, scores in (("before (gates closed)", before), ("after", after)):
        cells = "  ".join(f"{scores[f'{s}/loss']:>9.3f}" for s in sources)
        lines.append(f"{name:<23} {cells}")
    cells = "  ".join(f"{swapped[s]:>9.3f}" for s in sources)
    lines.append(f"{'after, images swapped':<23} {cells}")
    found = transcribed["transcribe"]
    lines.append(
        f"transcribe: character error rate {found['character_error_rate']:.1%} over "
        f"{found['lines']} held-out lines ({found['exact_match']:.1%} exact)"
    )
    for shots in classified["classify"]:
        lines.append(
            f"classify, {shots['shots']}-shot: accuracy {shots['accuracy']:.1%} over "
            f"{shots['items']} held-out items (chance 10%)"
        )
    lines.append(
        "gates, tanh (attention / ffn) before each layer: "
        + ", ".join(f"{k}: {g['attention']:+.3f} / {g['ffn']:+.3f}" for k, g in gates.items())
    )
    save(args.out, "tiny_vision-cpu", result, "\n".join(lines))


if __name__ == "__main__":
    main()
