"""The training loop: one process (CPU or one GPU) today; the parallel layouts wrap the same
loop from outside.

Every step consumes exactly ``schedule.batch_size(step)`` sequences from the mixture, split
into micro-batches with gradient accumulation; the loss is the mean over the step's label
tokens (exact across micro-batches) plus the MoE auxiliary loss. Checkpoints hold everything
needed to continue bit-for-bit: weights, optimizer, step, data-stream position and RNG.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from moegpt.config import Config, load_config, to_toml
from moegpt.console import stderr
from moegpt.data.mixture import IGNORE_INDEX, Mixture, MixtureLoader
from moegpt.errors import UserError
from moegpt.fileio import write_atomically
from moegpt.model import Transformer
from moegpt.plan.flops import training_token_flops
from moegpt.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from moegpt.train.metrics import MetricsWriter, device_peak_flops, router_health
from moegpt.train.schedule import build_schedule

RUN_CONFIG = "config.toml"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_optimizer(
    model: torch.nn.Module, config: Config, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms); fused kernels on GPU."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    train = config.train
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        fused=device.type == "cuda",
    )


def build_model(config: Config, device: torch.device) -> Transformer:
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model).to(device)
    if config.train.activation_checkpointing:
        for name, block in list(model.layers.items()):
            model.layers[name] = checkpoint_wrapper(block)
    if config.train.compile:
        for block in model.layers.values():
            block.compile()
    return model


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over label tokens (padding carries IGNORE_INDEX)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class Trainer:
    def __init__(
        self,
        config: Config,
        run_dir: Path,
        device: torch.device | None = None,
        log: Callable[[str], None] = lambda m: stderr.print(m, highlight=False),
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = device or default_device()
        self.log = log
        self.schedule = build_schedule(config.train)
        self.mixture = Mixture.open(config.data)
        if self.schedule.total_sequences > self.mixture.n_sequences:
            raise UserError(
                f"train.steps: the run needs {self.schedule.total_sequences:,} sequences but the "
                f"mixture holds {self.mixture.n_sequences:,} (lower train.steps or raise epochs)"
            )
        self.model = build_model(config, self.device)
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.loader = MixtureLoader(
            self.mixture, config.train.micro_batch_size, document_mask=config.data.document_mask
        )
        self.checkpoints = CheckpointManager(run_dir / "checkpoints", config.checkpoint.keep, log)
        self.step = 0
        self.tokens_seen = 0
        self.flops_per_token = training_token_flops(config.model, config.data.seq_len).training
        self.peak_flops = device_peak_flops(self.device)
        self._validation: dict[str, Mixture] = {}
        self._last_stats: list = []

    # -- state ---------------------------------------------------------------------------
    def _tensor_state(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state, "rng": rng_state()}

    def save(self) -> Path:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
        }
        return self.checkpoints.save(self.step, self._tensor_state(), state)

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint, if any; say which."""
        self.checkpoints.remove_partial()
        checkpoint = self.checkpoints.latest()
        if checkpoint is None:
            return False
        tensors = self._tensor_state()
        state = self.checkpoints.load(checkpoint, tensors)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=tensors["model"],
            optim_state_dict=tensors["optimizer"],
        )
        set_rng_state(tensors["rng"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.loader.load_state_dict(state["loader"])
        if self.step > self.schedule.steps or (
            self.loader.consumed != self.schedule.consumed_before[self.step]
        ):
            raise UserError(
                f"{checkpoint.path}: step {self.step} with {self.loader.consumed:,} sequences "
                "consumed does not fit this config's schedule (train.steps, batch sizes or the "
                "ramp changed); keep them, or train into a new --run-dir"
            )
        self.log(f"resuming from {checkpoint.path} (step {self.step})")
        return True

    # -- the loop ------------------------------------------------------------------------
    def _autocast(self) -> Any:
        bf16 = self.config.train.dtype == "bfloat16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._autocast():
            out = self.model(
                batch["input_ids"],
                positions=batch.get("positions"),
                document_ids=batch.get("document_ids"),
            )
        return lm_loss_sum(out.logits, batch["labels"]), out

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step over ``schedule.batch_size(step)`` sequences."""
        train = self.config.train
        micro_steps = self.schedule.batch_size(self.step) // train.micro_batch_size
        micro = [next(batches) for _ in range(micro_steps)]
        label_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
        lr = self.schedule.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Sums stay on the device: one host sync per step, when the metrics are read.
        # The LM loss is the exact mean over the step's label tokens; the auxiliary loss is
        # the mean of the micro-batches' (each balances its own micro-batch, as in Megatron).
        loss_sum = aux_sum = torch.zeros((), device=self.device)
        digest = hashlib.sha256()
        for batch in micro:
            digest.update(batch["input_ids"].numpy().tobytes())
            lm, out = self._forward(batch)
            loss = lm / max(label_tokens, 1) + out.aux_loss / micro_steps
            loss.backward()
            loss_sum = loss_sum + lm.detach()
            aux_sum = aux_sum + out.aux_loss.detach() / micro_steps
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), train.grad_clip if train.grad_clip > 0 else math.inf
        )
        loss_value, aux_value, norm = torch.stack([loss_sum, aux_sum, grad_norm]).tolist()
        skipped = not math.isfinite(norm)
        if skipped:  # a non-finite gradient would poison the weights and every checkpoint
            self.log(f"step {self.step + 1}: non-finite gradient norm; update skipped")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(b["input_ids"].numel() for b in micro)
        self.tokens_seen += tokens
        self.step += 1
        self._last_stats = out.moe_stats
        return {
            "loss": loss_value / max(label_tokens, 1),
            "aux_loss": aux_value,
            "lr": lr,
            "batch_size": self.schedule.batch_size(self.step - 1),
            "grad_norm": norm,
            "skipped": skipped,
            "tokens": tokens,
            "tokens_seen": self.tokens_seen,
            "data_sha256": digest.hexdigest()[:16],
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and perplexity per source."""
        self.model.eval()
        results = {}
        limit = self.config.train.eval_batches
        for source in self.config.data.sources:
            mixture = self._validation.get(source.name)
            if mixture is None:
                mixture = Mixture.open(self.config.data, split="val", source=source.name)
                self._validation[source.name] = mixture
            total, count = 0.0, 0
            loader = MixtureLoader(
                mixture,
                self.config.train.micro_batch_size,
                document_mask=self.config.data.document_mask,
            )
            for i, batch in enumerate(loader):
                if limit and i >= limit:
                    break
                lm, _ = self._forward(batch)
                total += lm.item()
                count += int((batch["labels"] != IGNORE_INDEX).sum())
            if count:
                results[f"{source.name}/loss"] = total / count
                results[f"{source.name}/ppl"] = math.exp(min(total / count, 50))
        self.model.train()
        return results

    def throughput(self, tokens: int, seconds: float) -> dict[str, Any]:
        tokens_per_second = tokens / seconds if seconds > 0 else 0.0
        flops = tokens_per_second * self.flops_per_token
        values: dict[str, Any] = {"tokens_per_second": tokens_per_second, "flops_per_second": flops}
        values["mfu"] = flops / self.peak_flops if self.peak_flops else None
        if self.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return values

    def run(self, resume: bool = True, progress: bool = True) -> dict[str, Any]:
        """Train to the end of the schedule; return the last step's metrics."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_config(self.run_dir, self.config)
        if resume:
            self.resume()
        elif self.checkpoints.latest() is not None:
            raise UserError(
                f"{self.run_dir}: holds checkpoints of an earlier run; resume it (--resume auto) "
                "or train into a new --run-dir"
            )
        train, every = self.config.train, self.config.checkpoint.every
        metrics = MetricsWriter(self.run_dir)
        batches = iter(self.loader)
        last: dict[str, Any] = {}
        window_tokens, window_start = 0, time.perf_counter()
        bar = _progress(self.schedule.steps, self.step, enabled=progress)
        try:
            with bar:
                task = bar.add_task("training", total=self.schedule.steps, completed=self.step)
                while self.step < self.schedule.steps:
                    last = self.train_step(batches)
                    window_tokens += last["tokens"]
                    elapsed = time.perf_counter() - window_start
                    last |= self.throughput(window_tokens, elapsed)
                    final = self.step == self.schedule.steps
                    logging = self.step % train.log_every == 0 or final
                    if logging:
                        last |= router_health(self._last_stats)
                    metrics.write("train", self.step, last)
                    bar.update(
                        task,
                        advance=1,
                        description=f"loss {last['loss']:.3f} "
                        f"{last['tokens_per_second']:,.0f} tok/s",
                    )
                    if logging:
                        bar.console.print(_log_line(self.step, self.schedule.steps, last))
                        window_tokens, window_start = 0, time.perf_counter()
                    if train.eval_every and (self.step % train.eval_every == 0 or final):
                        scores = self.evaluate()
                        metrics.write("eval", self.step, scores)
                        bar.console.print(_eval_line(self.step, scores), highlight=False)
                    if (every and self.step % every == 0) or final:
                        self.save()
                    if logging or final or (every and self.step % every == 0):
                        # evaluation and saving are not training time
                        window_tokens, window_start = 0, time.perf_counter()
        finally:
            metrics.close()
        return last


def _write_run_config(run_dir: Path, config: Config) -> None:
    """Keep the run's config beside its checkpoints; a resumed run must train the same model
    on the same data."""
    path = run_dir / RUN_CONFIG
    if path.is_file():
        previous = load_config(path)
        for section in ("model", "data"):
            if getattr(previous, section) != getattr(config, section):
                raise UserError(
                    f"{path}: the run directory holds a run with a different [{section}] "
                    "section; use a new --run-dir or the same config"
                )
    write_atomically(path, to_toml(config, with_help=False).encode())


def _progress(total: int, done: int, enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeRemainingColumn(),
        console=stderr,
        disable=not (enabled and stderr.is_terminal),
    )


def _log_line(step: int, total: int, m: dict[str, Any]) -> str:
    parts = [
        f"step {step}/{total}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.2e}",
        f"batch {m['batch_size']}",
        f"grad {m['grad_norm']:.2f}",
        f"{m['tokens_per_second']:,.0f} tok/s",
        f"{m['flops_per_second'] / 1e12:.2f} TFLOP/s",
        "MFU n/a (CPU)" if m["mfu"] is None else f"MFU {100 * m['mfu']:.1f}%",
    ]
    if "peak_memory_gb" in m:
        parts.append(f"mem {m['peak_memory_gb']:.1f} GB")
    if "load_balance_loss" in m:
        parts.append(
            f"router lb {m['load_balance_loss']:.3f} z {m['z_loss']:.2f} "
            f"load {m['expert_load_min']:.2f}-{m['expert_load_max']:.2f}x "
            f"drop {m['dropped_fraction']:.1%}"
        )
    return " | ".join(parts)


def _eval_line(step: int, scores: dict[str, float]) -> str:
    sources = sorted({k.split("/")[0] for k in scores})
    return f"eval @ {step}: " + ", ".join(
        f"{s} loss {scores[f'{s}/loss']:.4f} ppl {scores[f'{s}/ppl']:.1f}" for s in sources
    )
