"""Parameters by name across the wrappers parallelism adds, and freezing them by pattern
(``[train] freeze``), which ``parallelize`` applies once the layout is built."""

from __future__ import annotations

import fnmatch

import torch

from moegpt.config import Config, ModelConfig, VisionConfig
from moegpt.errors import UserError
from moegpt.model.vision import model_for

# Wrappers that parallelize() may put around modules, which name their parameters.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def parameter_name(name: str) -> str:
    """A parameter's name in the plain model, whatever wrappers parallelism added."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


# What the CLIP stage (vision.objective = "clip") does not train: all but the image encoder
# and the contrastive heads, whatever train.freeze lists.
CLIP_FROZEN = ("lm.*", "resampler.*", "xattn.*", "image_embedding")


def freeze_patterns(config: Config) -> tuple[str, ...]:
    """The parameter-name patterns a run freezes: ``train.freeze``'s, and for the CLIP stage
    everything it does not train."""
    patterns = config.train.freeze
    if config.vision.clip_stage:
        patterns += tuple(p for p in CLIP_FROZEN if p not in patterns)
    return patterns


def check_freeze_patterns(
    config: ModelConfig, vision: VisionConfig, patterns: tuple[str, ...]
) -> None:
    """Refuse a pattern that matches no parameter of the model (on any rank): a typo would
    otherwise train what was meant to stay fixed."""
    with torch.device("meta"):
        names = [name for name, _ in model_for(config, vision).named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise UserError(f"train.freeze: {pattern!r} matches no parameter of the model")


def freeze(modules: list[torch.nn.Module], patterns: tuple[str, ...]) -> int:
    """Stop training the parameters of ``modules`` whose names match any of ``patterns``;
    the elements frozen on this rank."""
    frozen = 0
    for module in modules:
        for name, param in module.named_parameters():
            if any(fnmatch.fnmatchcase(parameter_name(name), p) for p in patterns):
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen
