"""Tensor parallelism (Megatron-style, on DTensor): attention heads and dense feed-forward
hidden units split over the ``tp`` ranks, vocabulary-parallel embedding and head.

Multi-query attention has one K/V head that every rank's query heads read, so ``wk``/``wv`` are
replicated instead of split; each rank's heads contribute only part of their gradient, which
is summed over the TP ranks (:class:`ReplicatedKV`). Norms and the router stay plain replicated
parameters: every input they feed is all-reduced in backward, so their gradients already agree
on all TP ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from moegpt.model.feed_forward import FeedForward
from moegpt.model.transformer import Transformer


class ReplicatedKV(ParallelStyle):
    """A projection every TP rank computes in full (MQA's K/V) whose output each rank uses for
    its own heads only: the weight is a replicated DTensor, and the output's gradient is
    declared partial so that the weight's and the input's gradients are summed over ranks."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # Its weight's partial gradient is summed once, not per reader, by the hook that
        # keep_gradient_layouts adds once the parameters have their storage.
        return distribute_module(
            module, device_mesh, input_fn=self._prepare_input, output_fn=self._prepare_output
        )

    @staticmethod
    def _prepare_input(module: nn.Module, inputs: Any, mesh: DeviceMesh) -> Any:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        return (x, *inputs[1:])

    @staticmethod
    def _prepare_output(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> Any:
        return output.to_local(grad_placements=[Partial()])


def _shard_like_param(param: nn.Parameter) -> None:
    """Give a gradient its parameter's layout: DTensor's embedding backward yields a
    replicated gradient for a vocabulary-sharded weight (keep this rank's rows, no
    communication), and replicated K/V weights get partial gradients (sum them once)."""
    if param.grad is not None and param.grad.placements != param.placements:
        param.grad = param.grad.redistribute(param.device_mesh, param.placements)


# How tensor parallelism splits a module (the one plan, applied as DTensors in training by
# :func:`apply_tensor_parallel` and as plain blocks in serving by
# :func:`moegpt.parallel.serving.shard_for_serving`):
#   column: output features split (its input is whole on every rank);
#   row: input features split, the ranks' partial outputs summed;
#   vocab_embedding: vocabulary rows split, each rank embedding its own ids, the rows summed;
#   vocab_head: vocabulary split, the logits gathered whole;
#   replicated_kv: whole on every rank (MQA's one K/V head), each rank reading its own heads.
Split = Literal["column", "row", "vocab_embedding", "vocab_head", "replicated_kv"]


def tensor_parallel_plan(model: Transformer, tp: int) -> dict[str, Split]:
    """How each split module of ``model`` (a whole model or a pipeline stage) is split over
    ``tp`` ranks, by module name; the experts are split apart (by hidden unit)."""
    plan: dict[str, Split] = {}
    if not model.config.tie_embeddings:  # vocabulary-parallel embedding and head (a tied
        # pair stays replicated: the head reads the embedding's weight directly)
        if model.output is not None:
            plan["output"] = "vocab_head"
        if model.tok_embeddings is not None:
            plan["tok_embeddings"] = "vocab_embedding"
    kv: Split = "column" if model.config.n_kv_heads % tp == 0 else "replicated_kv"
    for name, block in model.layers.items():
        layer = f"layers.{name}"
        plan |= {f"{layer}.attention.wq": "column", f"{layer}.attention.wk": kv}
        plan |= {f"{layer}.attention.wv": kv, f"{layer}.attention.wo": "row"}
        if isinstance(block.ffn, FeedForward):
            plan[f"{layer}.ffn.w1"] = "column"
            if hasattr(block.ffn, "w3"):
                plan[f"{layer}.ffn.w3"] = "column"
            plan[f"{layer}.ffn.w2"] = "row"
    return plan


_STYLES: dict[Split, Callable[[], ParallelStyle]] = {
    "column": ColwiseParallel,
    "row": RowwiseParallel,
    "vocab_embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
    "vocab_head": lambda: ColwiseParallel(output_layouts=Replicate()),
    "replicated_kv": ReplicatedKV,
}


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Split ``model`` (a whole model or a pipeline stage) over ``tp_mesh`` in place, as
    DTensors.

    Expert weights are split separately (:func:`moegpt.parallel.experts.shard_experts`).
    """
    plan = tensor_parallel_plan(model, tp_mesh.size())
    parallelize_module(model, tp_mesh, {name: _STYLES[split]() for name, split in plan.items()})


def keep_gradient_layouts(model: nn.Module) -> None:
    """Give every DTensor parameter's gradient that parameter's layout after each backward
    (:func:`_shard_like_param`). Called once the parameters have their storage: materialising
    a meta-built model replaces the parameter objects, and hooks on the old ones are lost.
    Where the layouts already agree the hook does nothing; FSDP2 sets its shards' gradients
    itself, so it never runs for them."""
    for param in model.parameters():
        if isinstance(param, DTensor) and param.requires_grad:
            param.register_post_accumulate_grad_hook(_shard_like_param)
