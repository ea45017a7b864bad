"""An exported model folder with a real tokenizer (trained on torch's own source), for the
tests that drive the CLI and the HTTP server with text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moegpt.chat import chatml_tokenizer_config
from moegpt.data.tokenizer import train_tokenizer
from moegpt.model import Transformer
from moegpt.weights import save_model
from tests.conftest import small_config


def export_model(root: Path, **overrides: object) -> Path:
    source = Path(torch.__file__).with_name("functional.py").read_text()
    tokenizer = train_tokenizer([source], vocab_size=384)
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(chatml_tokenizer_config())  # as export writes
    torch.manual_seed(0)
    config = small_config(vocab_size=tokenizer.get_vocab_size(), **overrides)
    files = {name: root / name for name in ("tokenizer.json", "tokenizer_config.json")}
    return save_model(Transformer(config), root / "model", extra_files=files)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """MQA with a dense first layer and MoE layers, untied vocabulary-parallel embeddings."""
    root = tmp_path_factory.mktemp("text-model")
    return export_model(root, n_layers=3, first_k_dense=1, max_seq_len=128, tie_embeddings=False)
