"""The training loop: one process, or one rank of any ``[parallel]`` layout under torchrun.

Every step consumes exactly ``schedule.batch_size(step)`` sequences from the mixture, split
over the data-parallel ranks and into micro-batches; the loss is the mean over the step's label
tokens (exact across micro-batches and ranks: it is divided by the global count and gradients
are summed) plus the MoE auxiliary loss. Checkpoints hold everything needed to continue
bit-for-bit, in any layout: weights, optimizer, step, data-stream position and RNG.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from moegpt.config import Config, load_config, to_toml
from moegpt.console import human, stderr
from moegpt.data.mixture import IGNORE_INDEX, Mixture, MixtureLoader
from moegpt.errors import TrainingStopped, UserError
from moegpt.fileio import write_atomically
from moegpt.model import Transformer
from moegpt.model.vision import caption_count
from moegpt.parallel.apply import ModelParts, clip_grad_norm, parallelize, state_bytes
from moegpt.parallel.context import sequence_shards
from moegpt.parallel.mesh import ParallelDims
from moegpt.parallel.names import freeze_patterns
from moegpt.parallel.pipeline import build_schedule as build_pipeline_schedule
from moegpt.plan.flops import training_token_flops
from moegpt.plan.schedule import Schedule, build_schedule
from moegpt.plan.vision import vision_flops
from moegpt.train.checkpoint import (
    Checkpoint,
    CheckpointManager,
    from_rank0,
    is_rank0,
    rng_state,
    set_rng_state,
)
from moegpt.train.loss import cross_entropy_sum
from moegpt.train.metrics import MetricsWriter, device_peak_flops, router_health
from moegpt.train.stage import (
    PARENT_FILE,
    Parent,
    check_compatible,
    load_parent,
    parent_state,
    write_parent_record,
)

RUN_CONFIG = "config.toml"
# Optimizer states are saved flattened (one key per parameter and field), so a rank that holds
# only some parameters' states (ZeRO-1, pipeline stages) saves and loads just those.
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_optimizer(
    model: torch.nn.Module,
    config: Config,
    device: torch.device,
    zero_group: dist.ProcessGroup | None = None,
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms); fused kernels on GPU. With
    ``zero_group`` the states are sharded over its ranks (ZeRO-1)."""
    train = config.train
    groups = []
    # Fused and foreach kernels cannot mix DTensors (TP/EP/FSDP shards) with plain tensors
    # (replicated norms and routers), so each kind gets its own group.
    for distributed in (False, True):
        params = [
            p
            for p in model.parameters()
            if isinstance(p, DTensor) == distributed and p.requires_grad  # not train.freeze's
        ]
        for decayed in (True, False):
            chosen = [p for p in params if (p.ndim >= 2) == decayed]
            if chosen:
                groups.append(
                    {"params": chosen, "weight_decay": train.weight_decay if decayed else 0.0}
                )
    options = {"lr": train.lr, "betas": (train.beta1, train.beta2), "fused": device.type == "cuda"}
    if zero_group is not None:
        return ZeroRedundancyOptimizer(
            groups, optimizer_class=torch.optim.AdamW, process_group=zero_group, **options
        )
    return torch.optim.AdamW(groups, **options)


def _local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's states (ZeRO-1 wraps one per rank)."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def check_vocabulary(config: Config, log: Callable[[str], None]) -> None:
    """``model.vocab_size`` against the prepared tokenizer's ids: fewer rows than ids fail at
    the first id past them (an IndexError deep in the embedding); more rows than ids train
    rows no token ever reaches, which is said once."""
    from moegpt.data.shards import read_manifest

    data_dir = Path(config.data.data_dir)
    ids, rows = read_manifest(data_dir)["tokenizer"]["vocab_size"], config.model.vocab_size
    if rows < ids:
        raise UserError(
            f"model.vocab_size: {rows:,} rows for {data_dir}'s {ids:,}-id tokenizer (set it to "
            f"{ids:,})"
        )
    if rows > ids:
        log(
            f"model.vocab_size: {rows:,} rows for {data_dir}'s {ids:,}-id tokenizer: "
            f"{rows - ids:,} embedding and output rows never see a token"
        )


def check_image_token(config: Config) -> None:
    """The prepared tokenizer's ``<|image|>`` must be the id the model marks images with."""
    from moegpt.data.shards import read_manifest, tokenizer_file
    from moegpt.data.tokenizer import IMAGE, load_tokenizer

    data_dir = Path(config.data.data_dir)
    tokenizer = load_tokenizer(tokenizer_file(data_dir, read_manifest(data_dir)))
    found, wanted = tokenizer.token_to_id(IMAGE), config.vision.image_token_id
    if found != wanted:
        raise UserError(
            f"vision.image_token_id: {wanted}, but {data_dir}'s tokenizer has {IMAGE} at {found}"
        )


def build_model(config: Config, device: torch.device) -> Transformer:
    """The one-process training model (checkpointing and compile as the config asks)."""
    return parallelize(config, None, device).models[0]


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over label tokens (padding carries IGNORE_INDEX), in fp32 without
    an fp32 copy of the logits (:func:`moegpt.train.loss.cross_entropy_sum`)."""
    return cross_entropy_sum(logits, labels, IGNORE_INDEX)


def check_batches(schedule: Schedule, config: Config) -> None:
    """Every step's batch must split evenly into micro-batches on every data-parallel rank
    (and into whole pipeline rounds)."""
    p, micro = config.parallel, config.train.micro_batch_size
    unit = micro * p.dp * (p.pp_microbatches if p.pp > 1 else 1)
    for size in sorted(set(schedule.batch_sizes.tolist())):
        if size % unit:
            what = "micro_batch_size x data-parallel ranks"
            if p.pp > 1:
                what += " x parallel.pp_microbatches"
            raise UserError(
                f"train.global_batch_size: a batch of {size} sequences does not split into "
                f"{what} = {unit}; change the batch sizes (and the ramp) or the layout"
            )


class Trainer:
    def __init__(
        self,
        config: Config,
        run_dir: Path,
        device: torch.device | None = None,
        log: Callable[[str], None] = lambda m: stderr.print(m, highlight=False),
        dims: ParallelDims | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.device = device or default_device()
        self.dims = dims
        self.rank0 = is_rank0()
        self.log = log if self.rank0 else lambda m: None
        self.schedule = build_schedule(config.train)
        check_batches(self.schedule, config)
        self.mixture = Mixture.open(config.data)
        # The held-out files are checked now too (sizes and sha256), not at the first
        # evaluation, which may come hours into the run.
        self._validation = {
            s.name: Mixture.open(config.data, split="val", source=s.name)
            for s in config.data.sources
        }
        check_vocabulary(config, self.log)
        if config.vision.enabled:
            check_image_token(config)
            prepared = self.mixture.image_size
            if prepared and prepared != config.vision.image_size:
                raise UserError(
                    f"vision.image_size: {config.vision.image_size}, but {config.data.data_dir}'s "
                    f"images are {prepared} pixels (run `moegpt prepare --config ...`)"
                )
        if self.schedule.total_sequences > self.mixture.n_sequences:
            raise UserError(
                f"train.steps: the run needs {self.schedule.total_sequences:,} sequences but the "
                f"mixture holds {self.mixture.n_sequences:,} (lower train.steps or raise epochs)"
            )
        self.parts: ModelParts = parallelize(config, dims, self.device)
        if patterns := freeze_patterns(config):
            frozen = human(self.parts.frozen)
            self.log(f"frozen: {frozen} parameters ({', '.join(patterns)})")
        p = config.parallel
        zero_group = dims["dp"].get_group() if dims is not None and p.zero1 else None
        self.optimizers = [
            build_optimizer(m, config, self.device, zero_group) for m in self.parts.models
        ]
        self.dp_rank, self.dp_size = (dims.dp_rank, dims.dp_size) if dims else (0, 1)
        self.loader = MixtureLoader(
            self.mixture,
            config.train.micro_batch_size,
            rank=self.dp_rank,
            world_size=self.dp_size,
            document_mask=config.data.document_mask,
        )
        self.pipeline = None
        self._label_tokens: float | torch.Tensor = 1.0  # the pipeline's loss divides by it
        if self.parts.stages:
            self.pipeline = build_pipeline_schedule(
                self.parts.modules,
                self.parts.stage_ids,
                p.pp * p.stages_per_rank,
                p,
                dims["pp"].get_group(),
                self.device,
                lambda logits, labels: lm_loss_sum(logits, labels) / self._label_tokens,
            )
        self.checkpoints = CheckpointManager(run_dir / "checkpoints", config.checkpoint.keep, log)
        self.step = 0
        self.tokens_seen = 0
        self.flops_per_token = self._flops_per_token()
        self.peak_flops = device_peak_flops(self.device)
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._last_stats: list = []

    # -- collectives ---------------------------------------------------------------------
    def _flops_per_token(self) -> float:
        """Training FLOPs per token, for MFU: the language model's; with vision, the stage's,
        which counts what is frozen (backward through a frozen language model's activations,
        the encoder's forward alone; for the CLIP stage, the text tower's forward alone) and
        the images, one per ``tokens_per_image`` tokens."""
        config = self.config
        if not config.vision.enabled:
            return training_token_flops(config.model, config.data.seq_len).training
        model = self.parts.models[0]
        images = sum(
            split.documents * epochs
            for split, epochs in zip(self.mixture.splits, self.mixture.epochs, strict=True)
            if split.images is not None
        )
        tokens_per_image = sum(self.mixture.planned_tokens()) / max(images, 1)
        frozen = [
            not any(p.requires_grad for p in part.parameters())
            for part in (model.lm, model.encoder)
        ]
        flops = vision_flops(
            config.model, config.vision, config.data.seq_len, tokens_per_image, *frozen
        )
        return flops.clip_stage_per_token if config.vision.clip_stage else flops.stage_per_token

    def _sum_over(self, value: torch.Tensor, *dims: str) -> torch.Tensor:
        """Sum ``value`` over the named mesh dimensions ("dp", "pp", "cp") that have > 1
        rank."""
        if self.dims is not None:
            for name in dims:
                if self.dims[name].size() > 1:
                    dist.all_reduce(value, group=self.dims[name].get_group())
        return value

    # -- state ---------------------------------------------------------------------------
    def _part_states(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return [
            get_state_dict(model, _local_optimizer(opt), options=STATE_DICT_OPTIONS)
            for model, opt in zip(self.parts.models, self.optimizers, strict=True)
        ]

    def _tensor_state(self) -> tuple[dict[str, Any], list]:
        parts = self._part_states()
        model_state: dict[str, Any] = {}
        optim_state: dict[str, Any] = {}
        for m, o in parts:
            model_state |= m
            optim_state |= o
        return {"model": model_state, "optimizer": optim_state, "rng": rng_state()}, parts

    def save(self) -> Path:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "settings": self._resume_settings(),
        }
        return self.checkpoints.save(self.step, self._tensor_state()[0], state)

    def _resume_settings(self) -> dict[str, Any]:
        """The ``[train]`` settings a checkpoint records for its resumption."""
        train = self.config.train
        return {"train.steps": train.steps, "train.freeze": list(train.freeze)}

    def _check_resume_settings(self, checkpoint: Checkpoint, saved: dict[str, Any]) -> None:
        """Refuse, in one line, a frozen set other than the one ``checkpoint`` was trained
        with (which parameters have optimizer state follows it); say so when the run's length
        changed (allowed, to extend or shorten a run: the schedule follows the new length).
        Checkpoints from before the record pass."""
        train = self.config.train
        if "train.freeze" in saved and saved["train.freeze"] != list(train.freeze):
            raise UserError(
                f"train.freeze: {list(train.freeze)!r}, but {checkpoint.path} was trained with "
                f"{saved['train.freeze']!r}; keep it to resume, or train into a new --run-dir"
            )
        if saved.get("train.steps", train.steps) != train.steps:
            self.log(
                f"train.steps: {train.steps}, where {checkpoint.path} was trained for "
                f"{saved['train.steps']}; the learning-rate schedule follows the new length"
            )

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint, if any; say which. Refuses to start
        over when checkpoints exist but every one is damaged: that would discard the run."""
        self.checkpoints.clean_up()
        checkpoint = self.checkpoints.latest()
        if checkpoint is None:
            if damaged := self.checkpoints.set_aside():
                raise UserError(
                    f"{self.checkpoints.folder}: no usable checkpoint ({len(damaged)} damaged, "
                    f"set aside in {self.checkpoints.damaged_folder}); pass --resume never to "
                    "train from step 0, or put a good checkpoint back"
                )
            return False
        state = self.checkpoints.trainer_state(checkpoint)
        self._check_resume_settings(checkpoint, state.get("settings", {}))
        tensors, parts = self._tensor_state()
        self.checkpoints.load(checkpoint, tensors)
        for (model_part, optim_part), model, opt in zip(
            parts, self.parts.models, self.optimizers, strict=True
        ):
            set_state_dict(
                model,
                _local_optimizer(opt),
                model_state_dict={k: tensors["model"][k] for k in model_part},
                optim_state_dict={k: tensors["optimizer"][k] for k in optim_part},
                options=STATE_DICT_OPTIONS,
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

    def _open_parent(self) -> Parent | None:
        """``train.init_from``'s weights, checked against this run's model before anything
        is written; None without one."""
        if not self.config.train.init_from:
            return None
        problem, parent = None, None
        try:
            parent = load_parent(self.config.train.init_from)
            check_compatible(parent, self.config.model, self.config.vision)
        except UserError as e:
            problem = str(e)
        problem = from_rank0(problem)  # every rank stops, none waits in a collective
        if problem is not None:
            raise UserError(problem)
        return parent

    def start_from_parent(self, parent: Parent) -> None:
        """Load the parent's weights into this rank's model parts (each part takes its own
        tensors, sharded as it is) and record the parent beside the checkpoints."""
        # Not strict: a text parent gives a vision model only its language model's weights.
        options = StateDictOptions(full_state_dict=True, strict=False)
        vision = self.config.vision
        image_id = vision.image_token_id if vision.enabled else None
        for model in self.parts.models:
            # The model's names alone: asking for the optimizer's state too would initialise
            # it with a step, and the fresh optimizer would start at Adam's step 2.
            names = list(get_model_state_dict(model, options=STATE_DICT_OPTIONS))
            set_model_state_dict(model, parent_state(parent, names, image_id), options=options)
        if self.rank0:
            write_parent_record(self.run_dir, parent)
        self.log(f"starting from {parent.path} (sha256 {parent.sha256[:12]})")

    # -- the loop ------------------------------------------------------------------------
    def autocast(self) -> Any:
        """The training forward's precision: bf16 autocast on a GPU when train.dtype asks."""
        bf16 = self.config.train.dtype == "bfloat16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _sequence_shards(self, batch: dict[str, torch.Tensor]) -> Any:
        """Context parallelism: this rank's chunks of ``batch`` (on the device) while open."""
        cp = self.dims["cp"] if self.dims is not None else None
        return sequence_shards(cp, batch)

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """LM loss sum and model output of a device batch (inside its sequence shards)."""
        images = {"images": batch["images"]} if "images" in batch else {}
        with self.autocast():
            out = self.parts.modules[0](
                batch["input_ids"],
                positions=batch.get("positions"),
                document_ids=batch.get("document_ids"),
                padding=batch.get("padding"),
                **images,
            )
        if out.loss_sum is not None:  # the CLIP stage's own loss
            return out.loss_sum, out
        return lm_loss_sum(out.logits, batch["labels"]), out

    def _loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """What a batch's loss is the sum over: its label tokens, or for the CLIP stage its
        captioned images."""
        vision = self.config.vision
        if vision.clip_stage:
            ids = batch.get("document_ids")
            return caption_count(batch["input_ids"], vision.image_token_id, ids)
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def _no_sync(self, last: bool) -> Any:
        """DDP (ZeRO-1) must not all-reduce the gradients of a micro-batch that is not the
        step's last: accumulated gradients would be summed again."""
        module = self.parts.modules[0]
        if isinstance(module, DistributedDataParallel) and not last:
            return module.no_sync()
        return contextlib.nullcontext()

    def _accumulate(
        self, micro: list[dict[str, torch.Tensor]], label_tokens: torch.Tensor, micro_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over this rank's micro-batches; (LM loss sum, aux share)."""
        loss_sum = aux_sum = torch.zeros((), device=self.device)
        # Context-parallel ranks each balance their part of a sequence: their auxiliary losses
        # are averaged (summed gradients over 1/cp each).
        aux_weight = 1.0 / (micro_steps * self.config.parallel.cp)
        for i, host_batch in enumerate(micro):
            batch = self._to_device(host_batch)
            with self._no_sync(last=i == len(micro) - 1), self._sequence_shards(batch):
                lm, out = self._forward(batch)
                loss = lm / label_tokens + out.aux_loss * aux_weight
                loss.backward()
            loss_sum = loss_sum + lm.detach() / label_tokens
            aux_sum = aux_sum + out.aux_loss.detach() * aux_weight
            if "padding" not in host_batch or not host_batch["padding"].all():
                self._last_stats = out.moe_stats  # a row of padding alone has no statistics
        return loss_sum, aux_sum

    def _pipeline_rounds(
        self, micro: list[dict[str, torch.Tensor]], label_tokens: torch.Tensor, micro_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same through the pipeline, ``pp_microbatches`` micro-batches per round."""
        assert self.pipeline is not None
        n_moe = self.parts.stages[0].n_moe_layers
        for stage in self.parts.stages:
            stage.aux_weight = 1.0 / (n_moe * micro_steps)
            stage.aux_terms = []
        self._label_tokens = label_tokens
        loss_sum = torch.zeros((), device=self.device)
        per_round = self.config.parallel.pp_microbatches
        for r in range(0, len(micro), per_round):
            losses: list[torch.Tensor] = []
            self._run_pipeline(micro[r : r + per_round], losses, train=True)
            loss_sum = loss_sum + sum((x.detach().float() for x in losses), loss_sum.new_zeros(()))
        # Each stage runs one forward per micro-batch.
        aux = [s.step_aux(len(micro)).to(self.device) for s in self.parts.stages]
        aux_sum = sum(aux, torch.zeros((), device=self.device))
        self._last_stats = self.parts.stages[0].last_stats
        return loss_sum, aux_sum

    def _run_pipeline(
        self, micro: list[dict[str, torch.Tensor]], losses: list[torch.Tensor], train: bool
    ) -> None:
        assert self.pipeline is not None
        batch = self._to_device({k: torch.cat([b[k] for b in micro]) for k in micro[0]})
        kwargs = {k: batch[k] for k in ("positions", "document_ids", "padding") if k in batch}
        n_stages = self.config.parallel.pp * self.config.parallel.stages_per_rank
        args = (batch["input_ids"],) if 0 in self.parts.stage_ids else ()
        target = batch["labels"] if n_stages - 1 in self.parts.stage_ids else None
        run = self.pipeline.step if train else self.pipeline.eval
        with self.autocast():
            run(*args, target=target, losses=losses, **kwargs)

    def train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step over ``schedule.batch_size(step)`` sequences (all ranks)."""
        train = self.config.train
        micro_steps = self.schedule.batch_size(self.step) // train.micro_batch_size
        micro = [next(batches) for _ in range(micro_steps // self.dp_size)]
        local_labels = sum(self._loss_units(b) for b in micro)
        # Summed over the ranks on the device and read back with the step's other sums at its
        # end: read here, it would hold the host until the last step's optimizer finished.
        label_tokens = self._sum_over(
            torch.tensor(float(local_labels), device=self.device), "dp"
        ).clamp(min=1.0)
        lr = self.schedule.lr(self.step)
        for opt in self.optimizers:
            # Gradients live until the next step begins (torchtitan's order), so the state
            # bytes of a step can be measured after it.
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                group["lr"] = lr
        digest = hashlib.sha256()  # of this rank's share (all of it in one process)
        for batch in micro:
            digest.update(batch["input_ids"].numpy().tobytes())
        # The LM loss is the exact mean over the step's label tokens; the auxiliary loss is
        # the mean of the micro-batches' (each balances its own micro-batch, as in Megatron).
        step_fn = self._pipeline_rounds if self.pipeline is not None else self._accumulate
        loss_sum, aux_sum = step_fn(micro, label_tokens, micro_steps)
        pp_group = self.dims["pp"].get_group() if self.pipeline is not None else None
        max_norm = train.grad_clip if train.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.parts.parameters(), max_norm, pp_group)
        sums = self._sum_over(torch.stack([loss_sum, aux_sum]).float(), "dp", "pp", "cp")
        # Sums and the label count stay on the device until here: the step's one host sync.
        loss_value, aux_value, norm, labels = torch.cat(
            [sums, grad_norm.reshape(1).float(), label_tokens.reshape(1)]
        ).tolist()
        skipped = not math.isfinite(norm)
        if skipped:  # a non-finite gradient would poison the weights and every checkpoint
            # Backward spreads a NaN to everything before where it arose: name the latest.
            where = non_finite_gradients(self.parts.models) if self.rank0 else []
            found = (
                f"{len(where)} gradient{'s' * (len(where) > 1)}, the latest in the model "
                f"{where[-1]}"
                if where
                else "in other ranks' shards"
            )
            self.log(
                f"step {self.step + 1}: non-finite gradient norm (loss {loss_value:.4g}; "
                f"{found}); update skipped"
            )
        else:
            for opt in self.optimizers:
                opt.step()
        tokens = sum(b["input_ids"].numel() for b in micro) * self.dp_size
        self.tokens_seen += tokens
        self.step += 1
        return {
            "loss": loss_value,
            "aux_loss": aux_value,
            "lr": lr,
            "batch_size": self.schedule.batch_size(self.step - 1),
            "grad_norm": norm,
            "skipped": skipped,
            "tokens": tokens,  # positions run, padding included (what the hardware did)
            # what the loss averaged over: the step's label tokens (the CLIP stage: captions)
            "label_tokens": int(labels),
            "tokens_seen": self.tokens_seen,
            "data_sha256": digest.hexdigest()[:16],
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and perplexity per source: the first ``eval_batches`` micro-batches
        of each source (all of them if 0), split over the data-parallel ranks. The CLIP stage
        reports its contrastive loss per image and, as ``chance``, the loss of a uniform guess
        over the same micro-batches: ln of the images each holds (every other image of a
        rank's micro-batch is a negative, so chance grows with the batch)."""
        self.parts.train(False)
        results = {}
        limit = self.config.train.eval_batches
        p = self.config.parallel
        rows = self.config.train.micro_batch_size * (p.pp_microbatches if self.pipeline else 1)
        self._label_tokens = 1.0
        for source in self.config.data.sources:
            loader = MixtureLoader(
                self._validation[source.name],
                rows,
                rank=self.dp_rank,
                world_size=self.dp_size,
                document_mask=self.config.data.document_mask,
            )
            sums = torch.zeros(3, device=self.device)  # loss sum, label tokens, chance sum
            for batch in loader:
                # about the same sequences at every layout: count the whole job's batches
                started_at = loader.consumed - rows * self.dp_size
                if limit and started_at >= limit * self.config.train.micro_batch_size:
                    break
                units = self._loss_units(batch)
                sums[1] += units
                if self.config.vision.clip_stage:
                    sums[2] += units * math.log(max(units, 1))
                if self.pipeline is not None:
                    losses: list[torch.Tensor] = []
                    micro = list(batch_rows(batch, self.config.train.micro_batch_size))
                    self._run_pipeline(micro, losses, train=False)
                    sums[0] += sum((x.float() for x in losses), torch.zeros((), device=self.device))
                else:
                    batch = self._to_device(batch)
                    with self._sequence_shards(batch):
                        sums[0] += self._forward(batch)[0]
            self._sum_over(sums[:1], "pp", "cp")
            total, count, chance = self._sum_over(sums, "dp").tolist()
            if count:
                results[f"{source.name}/loss"] = total / count
                if self.config.vision.clip_stage:
                    results[f"{source.name}/chance"] = chance / count
                else:
                    results[f"{source.name}/ppl"] = math.exp(min(total / count, 50))
        self.parts.train(True)
        return results

    def throughput(self, tokens: int, seconds: float) -> dict[str, Any]:
        """Tokens/s of the whole job; MFU per GPU."""
        tokens_per_second = tokens / seconds if seconds > 0 else 0.0
        flops = tokens_per_second * self.flops_per_token
        values: dict[str, Any] = {"tokens_per_second": tokens_per_second, "flops_per_second": flops}
        peak = self.peak_flops * self.world_size if self.peak_flops else None
        values["mfu"] = flops / peak if peak else None
        if self.device.type == "cuda":
            values["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return values

    def rank_memory(self) -> list[dict[str, int]]:
        """Every rank's parameter, gradient and optimizer bytes (and peak device memory)."""
        mine: dict[str, int] = state_bytes(
            self.parts, [_local_optimizer(o) for o in self.optimizers]
        )
        if self.device.type == "cuda":
            mine["peak_allocated"] = torch.cuda.max_memory_allocated(self.device)
        if not dist.is_initialized():
            return [mine]
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone

    def _log_layout(self, metrics: MetricsWriter | None) -> None:
        """The mesh once, and after the first step each rank's memory."""
        ranks = self.rank_memory()
        if metrics is not None:
            metrics.write("ranks", self.step, {"ranks": ranks})
        for r, m in enumerate(ranks):
            line = (
                f"rank {r}: params {human(m['params'], 'B')}, grads {human(m['grads'], 'B')}, "
                f"optimizer {human(m['optimizer'], 'B')}"
            )
            if "peak_allocated" in m:
                line += f", peak allocated {human(m['peak_allocated'], 'B')}"
            self.log(line)

    def prepare(self, resume: bool = True) -> None:
        """Before the first step: continue from the newest checkpoint (``resume``), else
        start from ``train.init_from`` if set (a resumed run never reads its parent again),
        and keep the run's config beside its checkpoints. The config is written only once
        the run it describes has been accepted."""
        problem = None
        if self.rank0:
            try:
                _check_run_config(self.run_dir, self.config)
            except UserError as e:
                problem = str(e)
        problem = from_rank0(problem)  # every rank stops, none waits in a collective
        if problem is not None:
            raise UserError(problem)
        resumed = self.resume() if resume else False
        if not resume and self.checkpoints.latest() is not None:
            raise UserError(
                f"{self.run_dir}: holds checkpoints of an earlier run; resume it (--resume auto) "
                "or train into a new --run-dir"
            )
        elif not resume:
            self.checkpoints.write_off_damaged()
        parent = None if resumed else self._open_parent()
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(
                self.run_dir / RUN_CONFIG, to_toml(self.config, with_help=False).encode()
            )
            if not resumed and parent is None:  # an earlier attempt's, from another config
                (self.run_dir / PARENT_FILE).unlink(missing_ok=True)
        if parent is not None:
            self.start_from_parent(parent)

    def _stop_signal(self, stops: StopSignals) -> int:
        """The signal that asked this run to stop (0: none), agreed by every rank: torchrun
        passes a signal to each rank, which may get it during different steps."""
        if self.dims is None:
            return stops.received
        flag = torch.tensor([stops.received], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag)

    def _stop(self, signum: int, saved: Path | None) -> None:
        """Save (unless this step just did), say where the rerun resumes, and stop."""
        if not saved:
            self.log(f"{signal.Signals(signum).name}: saving step {self.step}, then stopping")
        path = saved or self.save()
        raise TrainingStopped(
            f"training stopped by {signal.Signals(signum).name} after step {self.step}; "
            f"checkpoint {path}: the same command resumes from step {self.step}",
            128 + signum,
        )

    def run(self, resume: bool = True, progress: bool = True) -> dict[str, Any]:
        """Train to the end of the schedule; return the last step's metrics. SIGINT or
        SIGTERM ends the run after the step in progress, with a checkpoint of it
        (:class:`TrainingStopped`); a second SIGINT stops at once."""
        self.prepare(resume)
        if self.dims is not None:
            self.log(self.dims.describe())
        train, every = self.config.train, self.config.checkpoint.every
        metrics = MetricsWriter(self.run_dir, self.step) if self.rank0 else None
        batches = iter(self.loader)
        last: dict[str, Any] = {}
        window_tokens, window_start = 0, time.perf_counter()
        bar = _progress(self.schedule.steps, self.step, enabled=progress and self.rank0)
        first_step = True
        try:
            with bar, StopSignals() as stops:
                task = bar.add_task("training", total=self.schedule.steps, completed=self.step)
                while self.step < self.schedule.steps:
                    last = self.train_step(batches)
                    if first_step:
                        self._log_layout(metrics)
                        first_step = False
                    window_tokens += last["tokens"]
                    elapsed = time.perf_counter() - window_start
                    last |= self.throughput(window_tokens, elapsed)
                    final = self.step == self.schedule.steps
                    logging = self.step % train.log_every == 0 or final
                    if logging:
                        last |= router_health(self._last_stats)
                    if metrics is not None:
                        metrics.write("train", self.step, last)
                    bar.update(
                        task,
                        advance=1,
                        description=f"loss {last['loss']:.3f} "
                        f"{last['tokens_per_second']:,.0f} tok/s",
                    )
                    if logging and self.rank0:
                        bar.console.print(_log_line(self.step, self.schedule.steps, last))
                    outside = time.perf_counter()
                    if train.eval_every and (self.step % train.eval_every == 0 or final):
                        scores = self.evaluate()
                        if metrics is not None:
                            metrics.write("eval", self.step, scores)
                            bar.console.print(_eval_line(self.step, scores), highlight=False)
                    saved = self.save() if (every and self.step % every == 0) or final else None
                    # evaluation and saving are not training time, whichever step they fall on
                    window_start += time.perf_counter() - outside
                    if logging:
                        window_tokens, window_start = 0, time.perf_counter()
                    signum = self._stop_signal(stops)
                    if signum and not final:
                        self._stop(signum, saved)
        finally:
            if metrics is not None:
                metrics.close()
        return last


def non_finite_gradients(models: list[torch.nn.Module]) -> list[str]:
    """Parameters whose gradient (this rank's shard of it) holds a NaN or an infinity, by
    their names in the model (wrappers' prefixes dropped), in the model's order: where a
    skipped update came from."""
    names = []
    for model in models:
        for name, param in model.named_parameters():
            grad = param.grad
            if grad is None:
                continue
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            if not bool(torch.isfinite(local).all()):
                names.append(re.sub(r"(_checkpoint_wrapped_module|_orig_mod)\.", "", name))
    return names


class StopSignals:
    """While inside: SIGINT and SIGTERM are recorded (``received``) rather than ending the
    process, so the training loop can finish its step and save. A second SIGINT raises
    KeyboardInterrupt at once. Outside the main thread it records nothing."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        # Only a flag: printing here could re-enter a write the loop is in the middle of.
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def batch_rows(batch: dict[str, torch.Tensor], rows: int) -> Iterator[dict[str, torch.Tensor]]:
    """Split a batch into consecutive pieces of ``rows`` rows."""
    n = next(iter(batch.values())).shape[0]
    for start in range(0, n, rows):
        yield {k: v[start : start + rows] for k, v in batch.items()}


def _check_run_config(run_dir: Path, config: Config) -> None:
    """Refuse a config whose model, vision parts or data differ from those of the run the
    directory already holds: a resumed run must train the same model on the same data."""
    path = run_dir / RUN_CONFIG
    if path.is_file():
        previous = load_config(path)
        for section in ("model", "vision", "data"):
            if getattr(previous, section) != getattr(config, section):
                raise UserError(
                    f"{path}: the run directory holds a run with a different [{section}] "
                    "section; use a new --run-dir or the same config"
                )


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
    """Each source's held-out loss, and its perplexity where the loss is a language model's."""
    sources = sorted({k.split("/")[0] for k in scores})
    parts = []
    for s in sources:
        ppl = f" ppl {scores[f'{s}/ppl']:.1f}" if f"{s}/ppl" in scores else ""
        chance = f" (chance {scores[f'{s}/chance']:.2f})" if f"{s}/chance" in scores else ""
        parts.append(f"{s} loss {scores[f'{s}/loss']:.4f}{ppl}{chance}")
    return f"eval @ {step}: " + ", ".join(parts)
