"""The moegpt model: plain PyTorch modules, no parallelism inside."""

from moegpt.model.kv_cache import KVCache
from moegpt.model.moe import MoEStats
from moegpt.model.transformer import ModelOutput, ParamCount, Transformer

__all__ = ["KVCache", "MoEStats", "ModelOutput", "ParamCount", "Transformer"]
