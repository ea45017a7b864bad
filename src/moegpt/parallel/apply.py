"""Apply a ``[parallel]`` layout to a freshly built model, in torchtitan's order but for
checkpointing, which wraps the compiled blocks: pipeline split, tensor and expert
parallelism, compile, activation checkpointing, then data parallelism (FSDP2 or DDP for
ZeRO-1). The model code itself stays free of parallelism.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from moegpt.config import Config
from moegpt.errors import UserError
from moegpt.model.moe import GroupedExperts
from moegpt.model.transformer import Transformer
from moegpt.model.vision import VisionLanguageModel, language_model, model_for
from moegpt.parallel.context import check_device
from moegpt.parallel.data import apply_ddp, apply_fsdp
from moegpt.parallel.experts import shard_experts
from moegpt.parallel.init import materialize
from moegpt.parallel.mesh import ParallelDims
from moegpt.parallel.names import check_freeze_patterns, freeze, freeze_patterns
from moegpt.parallel.pipeline import StageModule, stage_ids, stage_model
from moegpt.parallel.tensor import apply_tensor_parallel, keep_gradient_layouts
from moegpt.parallel.vision import apply_vision_fsdp, apply_vision_tensor_parallel


@dataclass
class ModelParts:
    """The model chunks one rank trains (one, or two with the interleaved pipeline)."""

    # Unwrapped chunks: parameters and state dicts come from here.
    models: list[Transformer | VisionLanguageModel]
    modules: list[nn.Module]  # what runs each chunk (a DDP wrapper under ZeRO-1, else the model)
    stages: list[StageModule] = field(default_factory=list)  # pipeline stages, if any
    stage_ids: list[int] = field(default_factory=list)
    frozen: int = 0  # elements of train.freeze's parameters on this rank

    def parameters(self) -> Iterable[nn.Parameter]:
        for model in self.models:
            yield from model.parameters()

    def train(self, mode: bool = True) -> None:
        for model in self.models:
            model.train(mode)


def check_supported(config: Config) -> None:
    """Layouts the config allows (and the planner plans) but the trainer cannot run yet."""
    p = config.parallel
    if p.zero1 and (p.tp > 1 or p.ep > 1 or p.pp > 1):
        # DDP inside pipeline stages miscounts gradients of several in-flight micro-batches
        # (measured against one process); FSDP2 has no such problem.
        raise UserError(
            "parallel.zero1: the trainer runs ZeRO-1 with data parallelism only; with tp, pp "
            "or ep use parallel.dp_shard (FSDP2)"
        )
    if config.vision.clip_stage and p.tp > 1:
        raise UserError(
            "parallel.tp: the CLIP stage trains only the image encoder, which tensor "
            "parallelism does not split; shard it with parallel.dp_shard (FSDP2)"
        )
    if config.vision.enabled and (p.pp > 1 or p.cp > 1):
        which = "pp" if p.pp > 1 else "cp"
        raise UserError(f"parallel.{which}: the trainer does not run vision models with it yet")
    if p.zero1 and config.train.compile:
        raise UserError("train.compile: not supported with parallel.zero1 (DDP) yet")


def fsdp_precision(dtype: str, reduce_dtype: str, device: torch.device) -> MixedPrecisionPolicy:
    """FSDP2's mixed precision: on GPUs a bfloat16 run gathers bfloat16 weights (fp32 master
    weights stay sharded) and sums gradients in ``reduce_dtype``; elsewhere all stays fp32
    (CPU bfloat16 matmuls are slow, and gloo's sums are the tests' exact reference)."""
    if dtype != "bfloat16" or device.type != "cuda":
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=getattr(torch, reduce_dtype)
    )


def parallelize(config: Config, dims: ParallelDims | None, device: torch.device) -> ModelParts:
    """Build the model on the meta device, lay it out, then materialise this rank's shards
    with the weights one process would hold (:func:`moegpt.parallel.init.materialize`).

    ``dims`` None is one process with no wrappers beyond checkpointing and compile.
    """
    check_supported(config)
    check_device(config.parallel.cp, device)
    if config.train.freeze:
        check_freeze_patterns(config.model, config.vision, config.train.freeze)
    torch.manual_seed(config.train.seed)  # the weights have their own generators (materialize)
    with torch.device("meta"):  # each rank materialises only its shards, below
        full = model_for(config.model, config.vision)
    p, train = config.parallel, config.train
    vision = isinstance(full, VisionLanguageModel)  # no pipeline or context parallelism
    ids = [0]
    chunks = [full]
    if dims is not None and p.pp > 1:
        n_stages = p.pp * p.stages_per_rank
        ids = stage_ids(p, dims.pp_rank)
        chunks = [stage_model(full, s, n_stages) for s in ids]
    for model in chunks:
        lm = language_model(model)
        if dims is not None and p.tp > 1:
            if vision:
                apply_vision_tensor_parallel(model, dims["tp"])
            else:
                apply_tensor_parallel(model, dims["tp"])
        if dims is not None and (p.tp > 1 or p.ep > 1):
            for experts in [m for m in model.modules() if isinstance(m, GroupedExperts)]:
                shard_experts(experts, dims)
        if train.compile:
            for block in lm.layers.values():
                block.compile()
        if train.activation_checkpointing:
            # Around the compiled block, so that dynamo never traces the checkpoint: traced
            # inside it (torchtitan's order), torch 2.11 built an invalid graph for a small-moe
            # block on an H200 ("Argument 'add_5' of Node 'output' does not belong to this
            # Graph"). The recomputation reruns the compiled forward.
            for name, block in list(lm.layers.items()):
                lm.layers[name] = checkpoint_wrapper(block)
        if dims is not None and p.dp * p.cp > 1 and not p.zero1:
            mp = fsdp_precision(train.dtype, p.reduce_dtype, device)
            if vision:
                apply_vision_fsdp(model, dims, mp)
            else:
                apply_fsdp(model, dims, mp)

    for model in chunks:  # the weights one process draws, each rank its part
        materialize(model, device, config.train.seed)
        if dims is not None and p.tp > 1:
            keep_gradient_layouts(model)
    n_moe = sum(config.model.is_moe_layer(i) for i in range(config.model.n_layers))
    stages = [StageModule(m, n_moe) for m in chunks] if dims is not None and p.pp > 1 else []
    # Frozen once the parameters are laid out (tensor parallelism makes new ones) and before
    # DDP (ZeRO-1), which registers the parameters that need gradients when it is built and
    # would wait for frozen ones forever.
    patterns = freeze_patterns(config)
    frozen = freeze(chunks, patterns) if patterns else 0
    runnable: list[nn.Module] = list(stages or chunks)
    if dims is not None and p.zero1 and p.dp > 1:
        runnable = [apply_ddp(m, dims) for m in runnable]
    return ModelParts(models=chunks, modules=runnable, stages=stages, stage_ids=ids, frozen=frozen)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm(
    parameters: Iterable[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Clip gradients by their global norm over every layout at once and return the norm.

    Gradients may be DTensors on different meshes (TP, FSDP, EP) or plain: each group's norm is
    completed over its own mesh, and pipeline stages add theirs over ``pp_group``.
    """
    by_layout: dict[object, list[nn.Parameter]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            g = p.grad
            by_layout[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(p)
    first = next(iter(by_layout.values()), None)
    device = _local(first[0].grad).device if first else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for params in by_layout.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = total_sq + norm.float().square()
    if pp_group is not None:
        dist.all_reduce(total_sq, group=pp_group)
    total = total_sq.sqrt()
    if math.isfinite(max_norm):
        # A non-finite norm would scale every gradient to NaN: leave them as they are (the
        # caller skips the update) so that the ones that hold it can be named. No host sync.
        scale_by = torch.where(total.isfinite(), total, torch.zeros_like(total))
        for params in by_layout.values():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, scale_by)
    return total


def state_bytes(parts: ModelParts, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer states (local shards)."""
    params = list(parts.parameters())
    optimizer = 0
    for opt in optimizers:
        for state in opt.state.values():
            optimizer += sum(
                _local(v).numel() * v.element_size()
                for k, v in state.items()
                if torch.is_tensor(v) and k != "step"
            )
    return {
        "params": sum(_local(p).numel() * p.element_size() for p in params),
        "grads": sum(
            _local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None
        ),
        "optimizer": optimizer,
    }
