"""Meta-device initialisation in one process: each parameter is its own generator's draw by
the model's rule, expert weights expert by expert (what every rank of a layout reproduces
for its part; tests/parallel/test_layouts.py compares the layouts)."""

from __future__ import annotations

import torch

from moegpt.model import Transformer
from moegpt.parallel.init import materialize, parameter_seed
from tests.conftest import small_config


def draw(model: Transformer, name: str, shape: torch.Size, key: str) -> torch.Tensor:
    tensor = torch.empty(shape)
    generator = torch.Generator().manual_seed(parameter_seed(7, key))
    model.init_parameter(name, tensor, generator)
    return tensor


def test_each_parameter_is_its_own_draw_and_experts_are_drawn_one_by_one() -> None:
    with torch.device("meta"):
        model = Transformer(small_config(n_experts=4))
    materialize(model, torch.device("cpu"), seed=7)
    reference = Transformer(small_config(n_experts=4))  # only for its rules
    experts = 0
    for name, param in model.named_parameters():
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            experts += 1
            for e in range(param.shape[0]):
                want = draw(reference, name, param.shape[1:], f"{name}[{e}]")
                assert torch.equal(param[e], want), (name, e)
        else:
            assert torch.equal(param, draw(reference, name, param.shape, name)), name
    assert experts == 3 * model.config.n_layers  # w1, w3, w2 of every MoE layer
    w2 = model.layers["0"].ffn.experts.w2
    std = model.config.init_std / (2 * model.config.n_layers) ** 0.5
    assert abs(w2.std().item() - std) < 0.2 * std  # the residual projections' smaller scale
    assert not torch.equal(w2[0], w2[1])  # each expert its own draw
