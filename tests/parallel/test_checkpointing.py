"""Activation checkpointing as ``parallelize`` applies it (around each block, compiled or
not): the same gradients as the plain model, from fewer activations kept for backward."""

from __future__ import annotations

import pytest
import torch

from moegpt.config import Config, DataConfig, TrainConfig
from moegpt.parallel.apply import parallelize
from tests.conftest import small_config


def gradients_and_saved_bytes(
    checkpointing: bool, compile: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """One forward and backward of a 2-layer MoE; its gradients, and the bytes autograd was
    handed to keep for backward outside any checkpoint (a checkpoint keeps its own inputs
    and recomputes the rest)."""
    train = TrainConfig(activation_checkpointing=checkpointing, compile=compile, seed=3)
    config = Config(model=small_config(), data=DataConfig(seq_len=24), train=train)
    model = parallelize(config, None, torch.device("cpu")).models[0]
    tokens = torch.randint(
        0, config.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(tokens)
    (out.logits.square().mean() + out.aux_loss).backward()
    grads = {
        name.replace("._checkpoint_wrapped_module", ""): p.grad
        for name, p in model.named_parameters()
    }
    return grads, saved


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_checkpointed_blocks_give_the_plain_gradients_from_fewer_saved_activations(
    compile: bool,
) -> None:
    plain, plain_saved = gradients_and_saved_bytes(checkpointing=False, compile=False)
    grads, saved = gradients_and_saved_bytes(checkpointing=True, compile=compile)
    assert grads.keys() == plain.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert saved < plain_saved / 2, (saved, plain_saved)
