"""Pipeline parallelism on ``torch.distributed.pipelining``.

The layer list is split into contiguous stages (the embedding on the first, the final norm
and head on the last); each stage is the model with the other parts deleted. The schedules
(GPipe, 1F1B, interleaved 1F1B with two chunks per rank) come from torch. The LM loss is
computed on the last stage; each stage's MoE auxiliary loss joins the backward pass where its
layers are (:class:`_AttachAuxLoss`), so no stage needs another's losses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from moegpt.config import ParallelConfig
from moegpt.model.transformer import Transformer

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, as even as possible (earlier stages take the extra layers,
    as ``moegpt plan`` assumes)."""
    base, extra = divmod(n_layers, n_stages)
    ranges, first = [], 0
    for s in range(n_stages):
        n = base + (s < extra)
        ranges.append(range(first, first + n))
        first += n
    return ranges


def stage_model(full: Transformer, stage: int, n_stages: int) -> Transformer:
    """A copy of ``full`` holding only what pipeline stage ``stage`` computes."""
    model = copy.deepcopy(full)
    keep = stage_layers(full.config.n_layers, n_stages)[stage]
    for name in list(model.layers.keys()):
        if int(name) not in keep:
            del model.layers[name]
    if stage > 0:
        model.tok_embeddings = None
    if stage < n_stages - 1:
        model.norm = None
        model.output = None
    return model


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the hidden states whose backward also back-propagates the stage's
    (already weighted) auxiliary loss, as if it had been added to the final loss."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, aux: torch.Tensor):
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


class StageModule(nn.Module):
    """What a ``PipelineStage`` runs: the stage's model, returning a tensor.

    ``aux_weight`` (set by the trainer each step) is 1 / (MoE layers of the whole model x
    micro-batches of the step), so the auxiliary losses weigh what they weigh in one process.
    """

    def __init__(self, model: Transformer, n_moe_layers: int) -> None:
        super().__init__()
        self.model = model
        self.n_moe_layers = max(n_moe_layers, 1)
        self.aux_weight = 0.0
        # Each forward's weighted auxiliary loss, for the log. The first step's list also
        # holds the forward torch's PipelineStage runs on placeholder inputs to infer shapes
        # (never backpropagated): a step's are its last ones (see :meth:`step_aux`).
        self.aux_terms: list[torch.Tensor] = []
        self.last_stats: list = []

    def step_aux(self, forwards: int) -> torch.Tensor:
        """The summed auxiliary loss of the step's last ``forwards`` forwards (0 without)."""
        terms = self.aux_terms[-forwards:] if forwards else []
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.model(x, positions=positions, document_ids=document_ids, padding=padding)
        self.last_stats = out.moe_stats
        if not out.moe_stats or not torch.is_grad_enabled():
            return out.logits
        aux = torch.stack([s.aux_loss for s in out.moe_stats]).sum() * self.aux_weight
        self.aux_terms.append(aux.detach())
        return _AttachAuxLoss.apply(out.logits, aux)


def build_schedule(
    stages: list[StageModule],
    stage_ids: list[int],
    n_stages: int,
    config: ParallelConfig,
    group: torch.distributed.ProcessGroup,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """The schedule running this rank's stages. Gradients are not rescaled by the schedule:
    ``loss_fn`` already divides by the step's label tokens."""
    pipeline_stages = [
        PipelineStage(module, sid, n_stages, device, group=group)
        for module, sid in zip(stages, stage_ids, strict=True)
    ]
    n = config.pp_microbatches
    if config.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(pipeline_stages, n, loss_fn=loss_fn, scale_grads=False)
    schedule = SCHEDULES[config.pp_schedule]
    return schedule(pipeline_stages[0], n, loss_fn=loss_fn, scale_grads=False)


def stage_ids(config: ParallelConfig, pp_rank: int) -> list[int]:
    """Stages rank ``pp_rank`` runs: one, or (interleaved) one per round, ``pp`` apart."""
    return [pp_rank + round_ * config.pp for round_ in range(config.stages_per_rank)]
