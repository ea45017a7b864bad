"""The vision-language model's forward and backward under FSDP2 and under TP2 on two gloo CPU
ranks equal one process: the same losses, and the same gradient for every parameter (the
language model's, the encoder's, the resampler's and the cross-attention's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from moegpt.config import ParallelConfig
from moegpt.model import Transformer
from moegpt.model.vision import VisionLanguageModel
from moegpt.parallel.mesh import ParallelDims
from moegpt.parallel.names import CLIP_FROZEN, freeze
from moegpt.parallel.vision import apply_vision_fsdp, apply_vision_tensor_parallel
from tests.conftest import small_config, small_vision_config
from tests.parallel.test_context import free_port

IMAGE, RANKS = 5, 2
VISION = small_vision_config()


def build(layout: str = "") -> VisionLanguageModel:
    """The same model on every rank and in the reference, its gates open (closed gates would
    leave the cross-attention without gradients); the CLIP stage's for ``*-clip`` layouts."""
    torch.manual_seed(0)
    vision = small_vision_config(objective="clip") if layout.endswith("clip") else VISION
    # Dense layers: tensor parallelism splits a dense feed-forward layer by hidden units.
    model = VisionLanguageModel(Transformer(small_config(n_experts=0)), vision, IMAGE)
    with torch.no_grad():
        for block in model.xattn.values():
            block.attention_gate.fill_(0.6)
            block.ffn_gate.fill_(-0.3)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four sequences with 2, 1, 0 and 2 images."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(6, 97, (4, 10), generator=generator)
    for row, places in enumerate([[0, 6], [3], [], [1, 2]]):
        tokens[row, places] = IMAGE
    return tokens, torch.randn(4, 2, 1, 8, 8, generator=generator)


def loss_of(model: VisionLanguageModel, tokens: torch.Tensor, images: torch.Tensor):
    """Summed next-token loss, so that rank shares add up to the whole batch's (the CLIP
    stage's summed contrastive loss, negatives from the rank's own rows)."""
    out = model(tokens, images)
    if out.loss_sum is not None:
        return out.loss_sum
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")


def gradients(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad
        out[name] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return out


def _rank(rank: int, port: int, layout: str, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=RANKS)
    model = build(layout)
    tokens, images = batch()
    if layout == "tp2":
        dims = ParallelDims.build(ParallelConfig(tp=RANKS), torch.device("cpu"))
        apply_vision_tensor_parallel(model, dims["tp"])
        for block in model.xattn.values():  # split, not merely computed on every rank
            assert block.q.weight.to_local().shape[0] == block.q.weight.shape[0] // RANKS
    else:  # fsdp2, fsdp2-clip: each rank takes half the batch
        dims = ParallelDims.build(ParallelConfig(dp_shard=RANKS), torch.device("cpu"))
        apply_vision_fsdp(model, dims, MixedPrecisionPolicy())
        share = tokens.shape[0] // RANKS
        tokens, images = (t[rank * share : (rank + 1) * share] for t in (tokens, images))
    if layout.endswith("clip"):  # as parallelize leaves the CLIP stage: frozen but its parts
        freeze([model], CLIP_FROZEN)
    loss = loss_of(model, tokens, images)
    loss.backward()
    total = loss.detach().clone()
    if layout.startswith("fsdp2"):
        dist.all_reduce(total)
    grads = gradients(model)
    if rank == 0:
        torch.save({"loss": total, "grads": grads}, out / f"{layout}.pt")
    # Every rank's collectives done before teardown: a gloo rank that tore down while its
    # peer's last one was in flight once aborted ("terminate called without an active
    # exception").
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["tp2", "fsdp2", "fsdp2-clip"])
def test_forward_and_backward_equal_one_process(tmp_path: Path, layout: str) -> None:
    mp.spawn(_rank, args=(free_port(), layout, tmp_path), nprocs=RANKS, join=True)
    reference = build(layout)
    tokens, images = batch()
    if layout == "fsdp2-clip":  # each rank's rows are their own negatives
        half = tokens.shape[0] // RANKS
        loss = loss_of(reference, tokens[:half], images[:half])
        loss = loss + loss_of(reference, tokens[half:], images[half:])
    else:
        loss = loss_of(reference, tokens, images)
    loss.backward()
    result = torch.load(tmp_path / f"{layout}.pt", weights_only=True)
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
    expected = gradients(reference)
    assert result["grads"].keys() == expected.keys()
    if layout == "fsdp2-clip":  # the encoder and heads alone learn in the CLIP stage
        untouched = {n for n, g in expected.items() if g is None}
        assert untouched == {n for n, g in result["grads"].items() if g is None}
        assert all(not n.startswith(("encoder.", "clip.")) for n in untouched)
        expected = {n: g for n, g in expected.items() if g is not None}
    for name, grad in expected.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_context_parallelism_is_refused_for_vision() -> None:
    """A rank holding part of a sequence cannot tell which image its tokens follow."""
    from types import SimpleNamespace

    from moegpt.errors import UserError

    dims = SimpleNamespace(config=ParallelConfig(cp=2))
    with pytest.raises(UserError, match="parallel.cp: context parallelism does not support"):
        apply_vision_fsdp(build(), dims, MixedPrecisionPolicy())
