"""moegpt: plan, pretrain, extend, tune and serve a sparse GPT-4-style Mixture-of-Experts model."""

from importlib.metadata import PackageNotFoundError, version

from moegpt.config import Config, ModelConfig, load_config
from moegpt.model import ModelOutput, Transformer
from moegpt.weights import load, save_model

try:
    __version__ = version("moegpt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Config",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "__version__",
    "load",
    "load_config",
    "save_model",
]
