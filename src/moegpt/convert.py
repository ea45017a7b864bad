"""Convert between moegpt checkpoint folders and Hugging Face Mixtral / Llama folders.

Both directions are pure renames and stacks of tensors (no value changes), so a round trip
gives back identical tensors. Hugging Face weights are read from safetensors only, single file
or sharded; pickled ``pytorch_model.bin`` files are refused.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moegpt.config import ModelConfig, RopeScaling
from moegpt.console import progress
from moegpt.errors import ConfigError, UserError
from moegpt.weights import (
    CONFIG_FILE,
    FORMAT,
    WEIGHT_DTYPES,
    WEIGHTS_FILE,
    checkpoint_meta,
    load_model_config,
    load_vision_config,
    read_json,
    write_folder_atomically,
    write_weights,
)

Format = Literal["moegpt", "mixtral", "llama"]
HF_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM"}
# Files that travel with the weights unchanged, in both directions.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)

# moegpt name <- Hugging Face name, per layer ({i}) and global; experts are handled apart.
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
}
_DENSE_FFN_NAMES = {
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
EXPERT_WEIGHTS = ("w1", "w2", "w3")  # Mixtral's per-expert names are ours too


def detect_format(folder: Path) -> Format:
    meta = read_json(folder / CONFIG_FILE)
    if meta.get("format") == FORMAT:
        return "moegpt"
    model_type = meta.get("model_type")
    if model_type in HF_ARCHITECTURES:
        return model_type
    raise UserError(
        f"{folder / CONFIG_FILE}: unsupported model_type {model_type!r} "
        f"(moegpt converts {', '.join(HF_ARCHITECTURES)} and its own folders)"
    )


class SafetensorsFolder:
    """Lazy access to the tensors of a folder's single or sharded safetensors files."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif (folder / WEIGHTS_FILE).is_file():
            files, weight_map = [WEIGHTS_FILE], {}
        elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UserError(f"{folder}: only safetensors weights are read (pickles are refused)")
        else:
            raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}
        for name in files:
            if not (folder / name).is_file():
                raise UserError(f"{folder / name}: shard named in the index is missing")
            self._handles[name] = stack.enter_context(safe_open(folder / name, framework="pt"))
        self._where = weight_map or dict.fromkeys(self._handles[WEIGHTS_FILE].keys(), WEIGHTS_FILE)
        self.folder = folder

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        tensor = self._handles[self._where[name]].get_tensor(name)
        if tensor.dtype not in WEIGHT_DTYPES.values():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise UserError(
                f"{self.folder}: tensor {name} is {dtype}; moegpt converts float32, bfloat16 "
                "and float16 weights"
            )
        return tensor

    def dtype_name(self) -> str:
        first = next(iter(self._where))
        return str(self.get(first).dtype).removeprefix("torch.")


# Rotary parameters of a Hugging Face config that are numbers (checked before any arithmetic).
NUMERIC_ROPE_KEYS = {
    "rope_theta",
    "factor",
    "original_max_position_embeddings",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "beta_fast",
    "beta_slow",
    "low_freq_factor",
    "high_freq_factor",
    "partial_rotary_factor",
}


def _rope(hf: dict[str, Any], where: Path) -> tuple[float, RopeScaling]:
    """The rotary base and scaling of a Hugging Face config (``rope_parameters``, or the older
    ``rope_theta`` with ``rope_scaling``)."""
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise UserError(f"{where}: {key} must be an object, got {hf[key]!r}")
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    for key in NUMERIC_ROPE_KEYS & params.keys():
        if not isinstance(params[key], int | float) or isinstance(params[key], bool):
            raise UserError(f"{where}: rope {key} must be a number, got {params[key]!r}")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, int | float) or isinstance(theta, bool):
        raise UserError(f"{where}: rope_theta must be a number, got {theta!r}")
    theta = float(theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{where}: partial_rotary_factor is not supported by moegpt")
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type == "dynamic":
        raise UserError(
            f"{where}: rope type 'dynamic' changes the rotation speeds with each sequence's "
            "length, which cached keys cannot follow; moegpt's fixed equivalent is 'ntk'"
        )
    if rope_type not in ("linear", "yarn", "llama3"):
        raise UserError(f"{where}: rope type {rope_type!r} is not supported by moegpt")
    original = params.get("original_max_position_embeddings") or 0
    factor = params.get("factor")
    if factor is None and original:  # DeepSeek-style: the ratio of the two contexts
        factor = hf.get("max_position_embeddings", original) / original
    fields: dict[str, Any] = {"type": rope_type, "factor": factor or 1.0}
    if rope_type == "yarn":
        if params.get("truncate", True) is False:
            raise UserError(f"{where}: yarn with truncate = false is not supported by moegpt")
        attention = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None and mscale and mscale_all and fields["factor"] > 1:
            log = math.log(fields["factor"])
            attention = (0.1 * mscale * log + 1.0) / (0.1 * mscale_all * log + 1.0)
        fields |= dict(
            original_max_seq_len=original,
            beta_fast=params.get("beta_fast") or 32.0,
            beta_slow=params.get("beta_slow") or 1.0,
            attention_factor=attention or 0.0,
        )
    elif rope_type == "llama3":
        fields |= dict(
            original_max_seq_len=original,
            low_freq_factor=params.get("low_freq_factor", 1.0),
            high_freq_factor=params.get("high_freq_factor", 4.0),
        )
    try:
        return theta, RopeScaling(**fields)
    except ConfigError as e:
        raise UserError(
            f"{where}: rope scaling converts to an invalid moegpt config ({e})"
        ) from None


def hf_rope_scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    """The older ``rope_scaling`` form of ``rope_parameters``: no base, the type under both
    names; None for the plain rotary embedding."""
    if rope["rope_type"] == "default":
        return None
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return scaling | {"type": rope["rope_type"]}


def hf_rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """``rope_parameters`` of a Hugging Face config equal to ``config``'s rotary embedding.

    Hugging Face has no fixed NTK-aware type (its ``dynamic`` follows the sequence length),
    so ``ntk`` is written as the plain rotary embedding with the base it amounts to.
    """
    scaling, theta = config.rope_scaling, config.rope_theta
    if scaling.type == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling.type == "ntk":
        d = config.head_dim
        return {"rope_type": "default", "rope_theta": theta * scaling.factor ** (d / (d - 2))}
    params: dict[str, Any] = {"rope_type": scaling.type, "rope_theta": theta}
    params["factor"] = scaling.factor
    if scaling.type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = scaling.original_max_seq_len
    if scaling.type == "yarn":
        params |= {"beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}
        if scaling.attention_factor:
            params["attention_factor"] = scaling.attention_factor
    if scaling.type == "llama3":
        params |= {
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
        }
    return params


def model_config_from_hf(hf: dict[str, Any], arch: str, where: Path) -> ModelConfig:
    """The moegpt model config equal to a Hugging Face Mixtral or Llama config."""
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
    required += ["intermediate_size"]
    if arch == "mixtral":
        required += ["num_local_experts", "num_experts_per_tok"]
    for key in required:
        if not isinstance(hf.get(key), int):
            raise UserError(f"{where}: {key} is missing or not an integer")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling = _rope(hf, where)
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "head_dim": hf.get("head_dim") not in (None, hidden // heads),
        "sliding_window": hf.get("sliding_window") is not None,
    }
    for key, bad in unsupported.items():
        if bad:
            raise UserError(f"{where}: {key} = {hf.get(key)!r} is not supported by moegpt")
    common = dict(
        vocab_size=hf["vocab_size"],
        d_model=hidden,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden=hf["intermediate_size"],
        activation="swiglu",
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )
    try:
        if arch == "llama":
            return ModelConfig(**common, n_experts=0)
        top_k = hf["num_experts_per_tok"]
        # HF's balance loss is E * sum_e (count_e / tokens) * P_e, top_k times ours (see MoE).
        return ModelConfig(
            **common,
            n_experts=hf["num_local_experts"],
            top_k=top_k,
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.001) * top_k,
        )
    except ConfigError as e:
        raise UserError(f"{where}: converts to an invalid moegpt config ({e})") from None


def hf_config_from_model(config: ModelConfig, arch: str, dtype: str) -> dict[str, Any]:
    """The Hugging Face config.json of ``config`` as ``arch``; refuses what ``arch`` cannot hold."""
    if config.activation != "swiglu":
        raise UserError(f"model.activation = {config.activation!r}: {arch} needs swiglu")
    if arch == "llama" and config.n_moe_layers:
        raise UserError("model.n_experts: a model with MoE layers cannot be written as llama")
    if arch == "mixtral":
        if config.n_moe_layers != config.n_layers:
            raise UserError("model.first_k_dense: mixtral needs every layer to be MoE")
        if config.capacity_factor:
            raise UserError("model.capacity_factor: mixtral is dropless; set it to 0 to convert")
    rope = hf_rope_parameters(config)
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.expert_hidden_size if arch == "mixtral" else config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        # transformers before 5 and llama.cpp's converter read the older key
        "rope_scaling": hf_rope_scaling(rope),
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "torch_dtype": dtype,
    }
    if arch == "mixtral":
        hf |= {
            "num_local_experts": config.n_experts,
            "num_experts_per_tok": config.top_k,
            "router_aux_loss_coef": config.aux_loss_coef / config.top_k,
            "sliding_window": None,
        }
    else:
        hf |= {"attention_bias": False, "mlp_bias": False}
    return hf


def _global_tensors(
    src: SafetensorsFolder, config: ModelConfig, to_hf: bool
) -> dict[str, torch.Tensor]:
    """Embedding, final norm and (untied) output head, renamed in the direction asked."""
    out = {}
    for ours, theirs in _GLOBAL_NAMES.items():
        if ours == "output.weight" and config.tie_embeddings:
            continue
        target, source = (theirs, ours) if to_hf else (ours, theirs)
        out[target] = src.get(source)
    return out


def _layer_as_moegpt(
    src: SafetensorsFolder, config: ModelConfig, i: int
) -> dict[str, torch.Tensor]:
    hf, ours = f"model.layers.{i}.", f"layers.{i}."
    names = _LAYER_NAMES if config.is_moe_layer(i) else _LAYER_NAMES | _DENSE_FFN_NAMES
    out = {ours + mine: src.get(hf + theirs) for mine, theirs in names.items()}
    if not config.is_moe_layer(i):
        return out
    legacy, fused = hf + "block_sparse_moe.", hf + "mlp."
    if legacy + "gate.weight" in src:  # the layout Mixtral checkpoints are saved in
        out[ours + "ffn.router.gate.weight"] = src.get(legacy + "gate.weight")
        for name in EXPERT_WEIGHTS:
            experts = [
                src.get(f"{legacy}experts.{e}.{name}.weight") for e in range(config.n_experts)
            ]
            out[ours + f"ffn.experts.{name}"] = torch.stack(experts)
    else:  # the fused layout newer transformers versions hold in memory
        out[ours + "ffn.router.gate.weight"] = src.get(fused + "gate.weight")
        w1, w3 = src.get(fused + "experts.gate_up_proj").chunk(2, dim=1)
        out[ours + "ffn.experts.w1"] = w1.contiguous()
        out[ours + "ffn.experts.w3"] = w3.contiguous()
        out[ours + "ffn.experts.w2"] = src.get(fused + "experts.down_proj")
    return out


def _layer_as_hf(src: SafetensorsFolder, config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    hf, ours = f"model.layers.{i}.", f"layers.{i}."
    names = _LAYER_NAMES if config.is_moe_layer(i) else _LAYER_NAMES | _DENSE_FFN_NAMES
    out = {hf + theirs: src.get(ours + mine) for mine, theirs in names.items()}
    if not config.is_moe_layer(i):
        return out
    legacy = hf + "block_sparse_moe."
    out[legacy + "gate.weight"] = src.get(ours + "ffn.router.gate.weight")
    for name in EXPERT_WEIGHTS:
        for e, weight in enumerate(src.get(ours + f"ffn.experts.{name}").unbind(0)):
            out[f"{legacy}experts.{e}.{name}.weight"] = weight.contiguous()
    return out


def convert(
    src: str | Path, dst: str | Path, to: Format | None = None, overwrite: bool = False
) -> Path:
    """Convert the checkpoint folder ``src`` into ``dst``.

    ``to`` defaults to moegpt for a Hugging Face source, and for a moegpt source to mixtral if
    the model has experts, llama otherwise.
    """
    src, dst = Path(src), Path(dst)
    if src.suffix == ".gguf" and src.is_file():
        return _convert_gguf(src, dst, to, overwrite)
    if not src.is_dir():
        raise UserError(f"{src}: checkpoint folder not found")
    source_format = detect_format(src)
    if source_format == "moegpt":
        config = load_model_config(src)
        if load_vision_config(src).enabled:
            raise UserError(
                f"{src}: a vision model; other formats have no place for its vision parts"
            )
        to = to or ("mixtral" if config.n_moe_layers else "llama")
    else:
        hf_config = read_json(src / CONFIG_FILE)
        config = model_config_from_hf(hf_config, source_format, src / CONFIG_FILE)
        to = to or "moegpt"
    if (source_format == "moegpt") == (to == "moegpt"):
        raise UserError(f"--to {to}: {src} is already a {source_format} folder")

    def write(folder: Path) -> None:
        with ExitStack() as stack:
            tensors = SafetensorsFolder(src, stack)
            if to == "moegpt":
                state = _as_moegpt(tensors, config)
                meta = checkpoint_meta(config)
            else:  # the config first: what the target cannot hold is refused before reading
                meta = hf_config_from_model(config, to, tensors.dtype_name())
                state = _global_tensors(tensors, config, True)
                for i in progress(range(config.n_layers), description=f"converting to {to}"):
                    state |= _layer_as_hf(tensors, config, i)
        if to == "moegpt":
            write_weights(folder, state, meta, file_format="pt")
        else:
            save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})
            (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, folder / name)

    return write_folder_atomically(dst, write, overwrite)


def _as_moegpt(tensors: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    """moegpt's tensors from a source that serves Hugging Face names."""
    state = _global_tensors(tensors, config, False)
    for i in progress(range(config.n_layers), description="converting to moegpt"):
        state |= _layer_as_moegpt(tensors, config, i)
    return state


def _convert_gguf(src: Path, dst: Path, to: Format | None, overwrite: bool) -> Path:
    """A GGUF file (dequantised) as a moegpt folder, with its tokenizer and chat template."""
    from moegpt.gguf_import import GGUFModel

    if to not in (None, "moegpt"):
        raise UserError(f"--to {to}: a GGUF file converts to a moegpt folder only")
    gguf = GGUFModel(src)
    config = model_config_from_hf(gguf.config, gguf.model_type, src)
    side = gguf.tokenizer_files()

    def write(folder: Path) -> None:
        write_weights(folder, _as_moegpt(gguf, config), checkpoint_meta(config), file_format="pt")
        for name, text in side.items():
            (folder / name).write_text(text)

    return write_folder_atomically(dst, write, overwrite)
