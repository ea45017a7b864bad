"""GGUF files (llama.cpp's format) as a conversion source: ``moegpt convert model.gguf DST``.

A GGUF file holds the model's hyper-parameters and tokenizer as metadata and its tensors,
often quantised, under llama.cpp's names. It is read through the ``gguf`` package: the
metadata become the Hugging Face config they came from, tensors are dequantised to float32
and served under their Hugging Face names (llama.cpp permutes the rows of the query and key
projections for its rotary layout; that is undone), so the Hugging Face import path converts
them. The tokenizer (a byte-level BPE) is rebuilt as a ``tokenizer.json`` and the chat
template, when the file has one, goes into ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moegpt.errors import UserError

# GGUF architectures moegpt expresses, and the Hugging Face model type each came from.
ARCHITECTURES = {"llama": "llama"}
# gguf metadata key (after "<arch>.") -> Hugging Face config key
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
# llama.cpp's scaling keys that change the attention temperature beyond what Hugging Face's
# yarn does (DeepSeek's), with the value that changes nothing.
UNSUPPORTED_YARN_KEYS = {"attn_factor": 1.0, "yarn_log_multiplier": 0.0}
_CONTROL = 3  # llama.cpp's token type of special (control) tokens
# Mixtral's per-expert weight name: the layer's experts, the expert, and the weight (gguf maps
# the stacked name without the expert)
_EXPERT = re.compile(r"(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight")
# llama.cpp's pre-tokenizer names moegpt rebuilds: GPT-2's split, and SmolLM's, which splits
# every digit off first (llama.cpp's "\p{N}" before GPT-2's expression).
PRE_TOKENIZERS = {"default": "gpt2", "gpt-2": "gpt2", "smollm": "digits"}


def _value(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


class GGUFModel:
    """A GGUF file read as a Hugging Face checkpoint: its config and its tensors by name."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: not a readable GGUF file ({e})") from None
        arch = _value(self.reader, "general.architecture")
        if arch not in ARCHITECTURES:
            raise UserError(
                f"{path}: GGUF architecture {arch!r} cannot be expressed by moegpt "
                f"(it converts {', '.join(ARCHITECTURES)})"
            )
        self.arch = arch
        # llama.cpp writes Mixtral as a Llama with experts (a count, and stacked expert tensors)
        experts = _value(self.reader, f"{arch}.expert_count")
        self.model_type = "mixtral" if experts else ARCHITECTURES[arch]
        self.config = self._hf_config()
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._stacked: tuple[str, torch.Tensor] | None = None  # the expert stack read last
        # Hugging Face name -> llama.cpp name, as llama.cpp's converter maps them
        model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
        self._names = gguf.get_tensor_name_map(model_arch, self.config["num_hidden_layers"])

    def _hf_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"model_type": self.model_type}
        for key, hf_key in _CONFIG_KEYS.items():
            value = _value(self.reader, f"{self.arch}.{key}")
            if value is not None:
                config[hf_key] = value
        tokens = _value(self.reader, "tokenizer.ggml.tokens")
        embedding = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        config["vocab_size"] = (
            int(embedding.shape[-1]) if embedding is not None else len(tokens or [])
        )
        config["tie_word_embeddings"] = not any(
            t.name == "output.weight" for t in self.reader.tensors
        )
        if self.model_type == "mixtral":
            config["num_local_experts"] = _value(self.reader, f"{self.arch}.expert_count")
            config["num_experts_per_tok"] = _value(self.reader, f"{self.arch}.expert_used_count")
            expert_ffn = _value(self.reader, f"{self.arch}.expert_feed_forward_length")
            if expert_ffn is not None:
                config["intermediate_size"] = expert_ffn
        head_dim = _value(self.reader, f"{self.arch}.rope.dimension_count")
        if head_dim is not None:
            config["head_dim"] = head_dim
        if (scaling := self._rope_scaling()) is not None:
            config["rope_scaling"] = scaling
        return config

    def _rope_scaling(self) -> dict[str, Any] | None:
        """The Hugging Face ``rope_scaling`` of llama.cpp's ``rope.scaling.*`` keys (or the
        older ``rope.scale_linear``); a scaling moegpt cannot express exactly is refused."""
        key = f"{self.arch}.rope.scaling"
        if any(t.name == "rope_freqs.weight" for t in self.reader.tensors):
            raise UserError(
                f"{self.path}: per-frequency rotary factors (rope_freqs, as llama.cpp writes "
                "Llama 3.1's scaling) are not converted yet; convert the Hugging Face "
                "checkpoint instead"
            )
        kind = _value(self.reader, f"{key}.type") or "none"
        factor = _value(self.reader, f"{key}.factor")
        legacy = _value(self.reader, f"{self.arch}.rope.scale_linear")
        if kind == "none" and legacy not in (None, 1.0):
            kind, factor = "linear", legacy
        if kind == "none":
            return None
        if kind not in ("linear", "yarn"):
            raise UserError(f"{self.path}: rotary scaling {kind!r} is not supported by moegpt")
        for unsupported, neutral in UNSUPPORTED_YARN_KEYS.items():
            value = _value(self.reader, f"{key}.{unsupported}")
            if value is not None and value != neutral:
                raise UserError(
                    f"{self.path}: {key}.{unsupported} = {value} has no moegpt equivalent"
                )
        scaling = {"rope_type": kind, "factor": factor}
        if kind == "yarn":
            scaling["original_max_position_embeddings"] = _value(
                self.reader, f"{key}.original_context_length"
            )
            for name in ("beta_fast", "beta_slow"):
                if (value := _value(self.reader, f"{key}.yarn_{name}")) is not None:
                    scaling[name] = value
        return scaling

    def __contains__(self, name: str) -> bool:
        expert = _EXPERT.fullmatch(name)
        stacked = f"{expert[1]}.{expert[3]}.weight" if expert else name
        return self._gguf_name(stacked) in self._tensors

    def _gguf_name(self, name: str) -> str | None:
        return self._names.get_name(name, try_suffixes=(".weight", ".bias"))

    def get(self, name: str) -> torch.Tensor:
        """The tensor Hugging Face names ``name``, dequantised to float32. One expert's
        weight (Mixtral's per-expert name) is a slice of the layer's stacked tensor, which is
        dequantised once for all its experts."""
        expert = _EXPERT.fullmatch(name)
        if expert is None:
            return torch.from_numpy(np.ascontiguousarray(self._read(name)))
        stacked, index = f"{expert[1]}.{expert[3]}.weight", int(expert[2])
        if self._stacked is None or self._stacked[0] != stacked:
            self._stacked = (stacked, torch.from_numpy(np.ascontiguousarray(self._read(stacked))))
        return self._stacked[1][index]

    def _read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        gguf_name = self._gguf_name(name)
        if gguf_name is None or gguf_name not in self._tensors:
            raise UserError(f"{self.path}: tensor {name} ({gguf_name}) is missing from the file")
        tensor = self._tensors[gguf_name]
        # A copy: an unquantised tensor would otherwise be a read-only view of the mapped file.
        weights = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        heads = self.config["num_attention_heads"]
        if name.endswith("self_attn.q_proj.weight"):
            weights = _unpermute(weights, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weights = _unpermute(weights, self.config.get("num_key_value_heads", heads))
        return weights

    def dtype_name(self) -> str:
        return "float32"

    def tokenizer_files(self) -> dict[str, str]:
        """``tokenizer.json`` (and ``tokenizer_config.json`` with the chat template) rebuilt
        from the file's tokenizer metadata; empty when it has none."""
        tokens = _value(self.reader, "tokenizer.ggml.tokens")
        if not tokens:
            return {}
        kind = _value(self.reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise UserError(
                f"{self.path}: tokenizer model {kind!r} is not converted (byte-level BPE only)"
            )
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        merges = [tuple(m.split(" ", 1)) for m in _value(self.reader, "tokenizer.ggml.merges")]
        vocab = {token: i for i, token in enumerate(tokens)}
        tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
        pre = _value(self.reader, "tokenizer.ggml.pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise UserError(
                f"{self.path}: pre-tokenizer {pre!r} is not rebuilt yet "
                f"({', '.join(PRE_TOKENIZERS)} are)"
            )
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if PRE_TOKENIZERS[pre] == "digits"
            else byte_level
        )
        tokenizer.decoder = decoders.ByteLevel()
        types = _value(self.reader, "tokenizer.ggml.token_type") or []
        special = [tokens[i] for i, kind in enumerate(types) if kind == _CONTROL]
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in special]
        )
        files = {"tokenizer.json": tokenizer.to_str()}
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for role in ("bos", "eos", "unknown", "padding"):
            token_id = _value(self.reader, f"tokenizer.ggml.{role}_token_id")
            if token_id is not None and 0 <= token_id < len(tokens):
                name = {"unknown": "unk", "padding": "pad"}.get(role, role)
                config[f"{name}_token"] = tokens[token_id]
        template = _value(self.reader, "tokenizer.chat_template")
        if template:
            config["chat_template"] = template
        files["tokenizer_config.json"] = json.dumps(config, indent=2) + "\n"
        return files


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a query or key projection (its rotary pairs are
    adjacent; Hugging Face's are half a head apart)."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
