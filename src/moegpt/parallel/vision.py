"""The vision-language model laid out over ranks, from outside as for text: the language model
with its own plans, the cross-attention blocks split like attention and feed-forward layers,
and the image encoder and resampler sharded by FSDP but not split by tensor parallelism (they
are small, and every TP rank computes them on the same images)."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from moegpt.errors import UserError
from moegpt.model.vision import VisionLanguageModel
from moegpt.parallel.data import apply_fsdp, dp_mesh, sum_gradients
from moegpt.parallel.mesh import ParallelDims
from moegpt.parallel.tensor import apply_tensor_parallel


def apply_vision_tensor_parallel(model: VisionLanguageModel, tp_mesh: DeviceMesh) -> None:
    """Split ``model`` over ``tp_mesh`` in place. Each cross-attention block's query, key and
    value heads and its feed-forward hidden units are split column-wise, its outputs
    row-wise. The visual tokens enter every block's key and value projections replicated, so
    their gradient is summed over the TP ranks in backward, and the encoder's and resampler's
    gradients agree on every rank."""
    apply_tensor_parallel(model.lm, tp_mesh)
    for block in model.xattn.values():
        plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel()}
        plan |= {"wo": RowwiseParallel(), "ffn.w1": ColwiseParallel(), "ffn.w2": RowwiseParallel()}
        if hasattr(block.ffn, "w3"):
            plan["ffn.w3"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)


def apply_vision_fsdp(
    model: VisionLanguageModel, dims: ParallelDims, mp_policy: MixedPrecisionPolicy
) -> None:
    """``fully_shard`` the language model as for text, each cross-attention block, the
    encoder and the resampler, then the rest (the ``<|image|>`` embedding) as the root.
    Context parallelism is refused: a rank holding part of a sequence cannot tell which image
    its tokens follow."""
    if dims.config.cp > 1:
        raise UserError("parallel.cp: context parallelism does not support vision models yet")
    apply_fsdp(model.lm, dims, mp_policy)
    mesh = dp_mesh(dims, "dp_shard")
    for part in [*model.xattn.values(), model.encoder, model.resampler]:
        fully_shard(
            part,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=dims.config.reshard_after_forward,
        )
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    sum_gradients(model)
