"""`moegpt upcycle SRC DST`: a dense model turned into a Mixture-of-Experts whose experts start
as copies of its feed-forward layers (sparse upcycling, Komatsuzaki et al. 2022).

Every dense feed-forward layer becomes an MoE layer of ``experts`` copies of itself (each
with the dense hidden size) behind a freshly initialised router; everything else is copied.
The router's top-k weights are renormalised to sum to 1, so while the experts are identical
the upcycled model computes exactly what the dense one does, whatever the router says; the
router and the experts then drift apart in training. ``noise`` adds Gaussian noise of that
standard deviation to each copy, to break the symmetry at once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moegpt.config import ConfigError, ModelConfig
from moegpt.errors import UserError
from moegpt.fileio import sha256_file
from moegpt.model import Transformer
from moegpt.weights import WEIGHTS_FILE, check_folder, load, save_model

# Files that travel with the weights (the tokenizer and its chat template).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def upcycled_config(dense: ModelConfig, experts: int, top_k: int) -> ModelConfig:
    """The MoE config of ``dense``: every layer routed, experts of the dense hidden size."""
    if experts < 2:
        raise UserError(f"--experts: an MoE needs at least 2 experts, got {experts}")
    if not 1 <= top_k <= experts:
        raise UserError(f"--top-k: must be in 1..{experts} (--experts), got {top_k}")
    try:
        return dataclasses.replace(
            dense,
            n_experts=experts,
            top_k=top_k,
            expert_hidden=dense.ffn_hidden,
            first_k_dense=0,
            router_renormalize=True,  # identical experts then sum to the dense output
            # dropless, so that training starts from the dense model's function too (a dense
            # recipe's capacity_factor meant nothing; a continuation may set one)
            capacity_factor=0.0,
        )
    except ConfigError as e:
        raise UserError(str(e)) from None


@torch.no_grad()
def upcycle_model(
    dense: Transformer, experts: int, top_k: int, noise: float = 0.0, seed: int = 0
) -> Transformer:
    """The upcycled model of ``dense`` (on CPU, in the dense model's dtype)."""
    config = upcycled_config(dense.config, experts, top_k)
    torch.manual_seed(seed)  # the routers' initialisation
    moe = Transformer(config).to(next(dense.parameters()).dtype)
    copied = dense.state_dict()
    state = moe.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if ".ffn.router." in name:
            continue  # freshly initialised
        if ".ffn.experts." in name:  # layers.{i}.ffn.experts.w1 <- layers.{i}.ffn.w1.weight
            prefix, _, weight = name.rpartition(".experts.")
            source = copied[f"{prefix}.{weight}.weight"]
            tensor.copy_(source.expand_as(tensor))
            if noise:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * noise)
            continue
        tensor.copy_(copied[name])
    moe.load_state_dict(state)
    return moe.eval()


def upcycle(
    src: str | Path,
    dst: str | Path,
    experts: int,
    top_k: int,
    noise: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the upcycled model of the dense folder ``src`` to ``dst``, with its tokenizer
    and chat template, and its parent (``src`` and the sha256 of its weights) in config.json."""
    src = Path(src)
    checked = check_folder(src)
    if checked.config.n_experts:
        raise UserError(
            f"{src}: already a Mixture-of-Experts (model.n_experts = {checked.config.n_experts});"
            " upcycle starts from a dense model"
        )
    if noise < 0:
        raise UserError(f"--noise: must be >= 0, got {noise}")
    moe = upcycle_model(load(src), experts, top_k, noise, seed)
    weights = src / WEIGHTS_FILE
    parent = {
        "path": str(src.resolve()),
        "sha256": sha256_file(weights),
        "upcycled": {"experts": experts, "top_k": top_k, "noise": noise, "seed": seed},
    }
    extra = {name: src / name for name in SIDE_FILES if (src / name).is_file()}
    return save_model(moe, dst, overwrite, extra_files=extra, parent=parent)
