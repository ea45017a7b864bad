"""Tensor parallelism (Megatron-style, on DTensor): attention heads and dense feed-forward
hidden units split over the ``tp`` ranks, vocabulary-parallel embedding and head.

Multi-query attention has one K/V head that every rank's query heads read, so ``wk``/``wv`` are
replicated instead of split; each rank's heads contribute only part of their gradient, which
is summed over the TP ranks (:class:`ReplicatedKV`). Norms and the router stay plain replicated
parameters: every input they feed is all-reduced in backward, so their gradients already agree
on all TP ranks.
"""

from __future__ import annotations

from typing import Any

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
        module = distribute_module(
            module, device_mesh, input_fn=self._prepare_input, output_fn=self._prepare_output
        )
        for param in module.parameters():  # sum the partial gradient once, not per reader
            param.register_post_accumulate_grad_hook(_shard_like_param)
        return module

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


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Split ``model`` (a whole model or a pipeline stage) over ``tp_mesh`` in place.

    Expert weights are split separately (:func:`moegpt.parallel.experts.shard_experts`).
    """
    tp = tp_mesh.size()
    top: dict[str, ParallelStyle] = {}
    if not model.config.tie_embeddings:  # vocabulary-parallel embedding and head (a tied
        # pair stays replicated: the head reads the embedding's weight directly)
        if model.output is not None:
            top["output"] = ColwiseParallel(output_layouts=Replicate())
        if model.tok_embeddings is not None:
            top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate())
    if top:
        parallelize_module(model, tp_mesh, top)
    if "tok_embeddings" in top:
        model.tok_embeddings.weight.register_post_accumulate_grad_hook(_shard_like_param)
    kv = ColwiseParallel() if model.config.n_kv_heads % tp == 0 else ReplicatedKV()
    for block in model.layers.values():
        plan: dict[str, ParallelStyle] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": kv,
            "attention.wv": kv,
            "attention.wo": RowwiseParallel(),
        }
        if isinstance(block.ffn, FeedForward):
            plan["ffn.w1"] = ColwiseParallel()
            if hasattr(block.ffn, "w3"):
                plan["ffn.w3"] = ColwiseParallel()
            plan["ffn.w2"] = RowwiseParallel()
        parallelize_module(block, tp_mesh, plan)
