"""Model folders are checked before anything is built or allocated: names, shapes and dtypes
from the safetensors header against config.json, finite weights; the serving KV cache is sized
by memory, not by max_seq_len."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moegpt
import moegpt.weights
from moegpt.cli import main
from moegpt.config import ServeConfig
from moegpt.errors import UserError
from moegpt.generate import generate
from moegpt.model import KVCache
from moegpt.serve.engine import Engine
from moegpt.serve.sequence import SamplingParams
from tests.conftest import restamp_weights, small_config


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return moegpt.save_model(moegpt.Transformer(small_config(first_k_dense=1)), tmp_path / "m")


def _edit_config(folder: Path, **model: object) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta["model"].update(model)
    (folder / "config.json").write_text(json.dumps(meta))


def _rewrite(folder: Path, change) -> dict[str, torch.Tensor]:
    weights = load_file(folder / "model.safetensors")
    weights = change(weights)
    save_file(weights, folder / "model.safetensors")
    restamp_weights(folder)
    return weights


def _one_line(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_million_layer_config_is_refused_without_building_it(folder: Path, monkeypatch) -> None:
    built: list[int] = []
    real = moegpt.weights.Transformer

    def recording(config):
        built.append(config.n_layers)
        return real(config)

    monkeypatch.setattr(moegpt.weights, "Transformer", recording)
    _edit_config(folder, n_layers=1_000_000)
    message = _one_line(
        r"model.safetensors: does not match config.json \(missing \['layers.2.attention_norm",
        moegpt.load,
        folder,
    )
    assert "config.json implies 10,000,002 tensors, the file holds 22" in message
    assert max(built, default=0) <= 2  # only the one- or two-layer template


def test_a_shape_claim_is_checked_from_the_header(folder: Path) -> None:
    _edit_config(folder, vocab_size=98)
    _one_line(
        r"tensor (output|tok_embeddings).weight has shape \(97, 32\), config.json implies "
        r"\(98, 32\)",
        moegpt.load,
        folder,
    )


@pytest.mark.parametrize(("dtype", "code"), [(torch.int32, "I32"), (torch.float64, "F64")])
def test_unsupported_dtypes_are_named(folder: Path, dtype, code: str) -> None:
    _rewrite(folder, lambda w: {k: v.to(dtype) for k, v in w.items()})
    _one_line(rf"tensor \S+ is {code}; moegpt weights are F32, BF16 or F16", moegpt.load, folder)


def test_float16_loads_exactly_as_float32(folder: Path) -> None:
    half = _rewrite(folder, lambda w: {k: v.half() for k, v in w.items()})
    model = moegpt.load(folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, half[name].float())
    assert {p.dtype for p in moegpt.load(folder, dtype=torch.float16).parameters()} == {
        torch.float16
    }


def test_mixed_dtypes_load_as_float32_and_uniform_bf16_stays(folder: Path) -> None:
    _rewrite(folder, lambda w: {k: v.bfloat16() if "norm" in k else v for k, v in w.items()})
    assert {p.dtype for p in moegpt.load(folder).parameters()} == {torch.float32}
    _rewrite(folder, lambda w: {k: v.bfloat16() for k, v in w.items()})
    assert {p.dtype for p in moegpt.load(folder).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(folder: Path, capsys, bad) -> None:
    def poison(w):
        w["layers.1.ffn.experts.w2"][0, 0, 0] = bad
        return w

    _rewrite(folder, poison)
    _one_line(r"tensor layers.1.ffn.experts.w2 has NaN or infinite values", moegpt.load, folder)
    assert main(["generate", str(folder), "--prompt", "x"]) == 2
    assert "tensor layers.1.ffn.experts.w2 has NaN" in capsys.readouterr().err


def test_a_cast_that_overflows_is_named(folder: Path) -> None:
    def big(w):
        w["norm.weight"][0] = 1e6
        return w

    _rewrite(folder, big)
    moegpt.load(folder)  # float32: fine
    _one_line(
        r"tensor norm.weight has values beyond torch.float16's range",
        moegpt.load,
        folder,
        dtype=torch.float16,
    )


def test_a_corrupt_header_is_one_line(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    _one_line("model.safetensors: not a safetensors file", moegpt.load, folder)
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["norm.weight"]["data_offsets"][1] += 4
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length
    raw = raw.ljust(length)
    path.write_bytes(data[:8] + raw + data[8 + length :])
    _one_line("tensor norm.weight: inconsistent safetensors header entry", moegpt.load, folder)


@pytest.fixture
def long_context(folder: Path, monkeypatch) -> Path:
    """A valid model whose config claims a billion-token context, on a 1 MiB KV budget; a
    cache past 10M tokens is refused before it is allocated, whatever the code under test."""
    import moegpt.serve.runner as runner

    real = runner.PagedKVCache

    def guarded(config, num_blocks, block_size, *args, **kwargs):
        assert num_blocks * block_size <= 10_000_000, "a KV cache sized by max_seq_len"
        return real(config, num_blocks, block_size, *args, **kwargs)

    monkeypatch.setattr(runner, "PagedKVCache", guarded)
    monkeypatch.setenv("MOEGPT_CPU_KV_GIB", str(1 / 1024))
    _edit_config(folder, max_seq_len=1_000_000_000)
    return folder


def test_the_kv_cache_is_sized_by_memory_not_max_seq_len(long_context: Path, capsys) -> None:
    engine = Engine.from_folder(long_context, ServeConfig(calibrate=False), device="cpu")
    cache = engine.forward.cache
    assert cache.k.numel() * cache.k.element_size() * 2 <= 1 << 20
    # 2 layers x 1 kv head x 8 dims x 4 bytes x (k, v): 128 bytes a token, 8192 tokens
    assert engine.max_context == engine.allocator.num_blocks * 16 == 8192
    err = capsys.readouterr().err
    assert "model.max_seq_len (1,000,000,000) does not fit the KV cache" in err
    assert "capped at 8,192 tokens" in err and len(err.strip().splitlines()) == 1
    done = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0))[0][0]
    assert len(done.token_ids) == 5
    _one_line(
        r"^prompt: 8192 tokens leave no room in the 8192-token KV cache",
        engine.add_request,
        [1] * 8192,
    )


def test_explicit_kv_blocks_must_fit_the_budget(long_context: Path) -> None:
    _one_line(
        r"^serve.num_kv_blocks: 1,000,000 blocks take 1.91 GiB, more than the KV-cache",
        Engine.from_folder,
        long_context,
        ServeConfig(num_kv_blocks=1_000_000),
        "cpu",
    )
    engine = Engine.from_folder(long_context, ServeConfig(num_kv_blocks=8, calibrate=False), "cpu")
    assert engine.max_context == 128


def test_max_model_len_sizes_the_cpu_cache_and_caps_requests(long_context: Path, capsys) -> None:
    """`--max-model-len` as vLLM has it: the CPU cache holds max_batch_size requests of that
    length (4 x 64 tokens here, far under the budget's 8192), and longer ones are refused."""
    config = ServeConfig(max_model_len=64, max_batch_size=4, calibrate=False)
    engine = Engine.from_folder(long_context, config, device="cpu")
    assert engine.allocator.num_blocks * 16 == 4 * 64 and engine.max_context == 64
    assert capsys.readouterr().err.count("does not fit the KV cache") == 0
    _one_line(
        r"^prompt: 64 tokens leave no room in the 64-token request limit \(serve.max_model_len\)",
        engine.add_request,
        [1] * 64,
    )
    _one_line(
        r"^serve.max_model_len: 2,000,000,000 exceeds the model's context \(model.max_seq_len",
        Engine.from_folder,
        long_context,
        ServeConfig(max_model_len=2_000_000_000, calibrate=False),
        "cpu",
    )


def test_a_bad_budget_setting_is_one_line(long_context: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOEGPT_CPU_KV_GIB", "lots")
    _one_line(
        "^MOEGPT_CPU_KV_GIB: expected a positive number of GiB, got 'lots'",
        Engine.from_folder,
        long_context,
        ServeConfig(calibrate=False),
        "cpu",
    )


def test_a_gpu_budget_is_a_share_of_free_memory_capped_by_its_setting(monkeypatch) -> None:
    """Processes sharing one GPU each cap their cache with MOEGPT_GPU_KV_GIB; unset, a cache
    takes 90% of the free memory (vLLM's default)."""
    from moegpt.memory import GIB, kv_budget_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * GIB, 141 * GIB))
    monkeypatch.delenv("MOEGPT_GPU_KV_GIB", raising=False)
    cuda = torch.device("cuda", 0)
    assert kv_budget_bytes(cuda) == (72 * GIB, "90% of the free memory of cuda:0")
    monkeypatch.setenv("MOEGPT_GPU_KV_GIB", "8")
    assert kv_budget_bytes(cuda) == (8 * GIB, "MOEGPT_GPU_KV_GIB (8 GiB)")
    monkeypatch.setenv("MOEGPT_GPU_KV_GIB", "100")  # more than there is: the share still holds
    assert kv_budget_bytes(cuda)[0] == 72 * GIB
    monkeypatch.setenv("MOEGPT_GPU_KV_GIB", "-1")
    _one_line(
        "^MOEGPT_GPU_KV_GIB: expected a positive number of GiB, got '-1'", kv_budget_bytes, cuda
    )


def test_generate_caps_its_cache_by_memory(long_context: Path, monkeypatch) -> None:
    monkeypatch.setenv("MOEGPT_CPU_KV_GIB", str(1 / 1024 / 64))  # 16 KiB: 128 tokens
    model = moegpt.load(long_context)
    sizes: list[int] = []
    real = KVCache.for_model.__func__

    def recording(cls, model, batch_size, max_len=None, dtype=None):
        sizes.append(max_len)
        assert max_len <= 10_000_000, "a cache sized by the request alone"
        return real(cls, model, batch_size, max_len, dtype)

    monkeypatch.setattr(KVCache, "for_model", classmethod(recording))
    out = generate(model, [1, 2, 3], max_new_tokens=10**9, temperature=0, stop_id=None)
    assert sizes == [128] and len(out) == 128 - 3 + 1  # the last token needs no cache
    _one_line("^prompt: 128 tokens of KV cache exceed the budget", generate, model, [1] * 128, 1)


def test_convert_refuses_weights_of_other_dtypes(tmp_path: Path, capsys) -> None:
    dense = moegpt.save_model(moegpt.Transformer(small_config(n_experts=0)), tmp_path / "d")
    _rewrite(dense, lambda w: {k: v.double() for k, v in w.items()})
    assert main(["convert", str(dense), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "is float64; moegpt converts float32, bfloat16 and float16 weights" in err
    assert not (tmp_path / "hf").exists()


def test_damaged_weights_are_caught_by_the_recorded_checksum(folder: Path, capsys) -> None:
    """Export records the weights' size and sha256; a same-size file with 4 KB overwritten
    loads silently without it."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-8192:-4096] = bytes(4096)  # inside the last tensor: the header still parses
    path.write_bytes(bytes(data))
    _one_line(
        "model.safetensors: sha256 differs from config.json's weights.sha256", moegpt.load, folder
    )
    assert moegpt.load(folder, verify=False) is not None  # the switch for huge files
    quick = ServeConfig(verify_weights=False, calibrate=False)
    assert Engine.from_folder(folder, quick, device="cpu").model is not None
    _one_line("sha256 differs", Engine.from_folder, folder, ServeConfig(calibrate=False), "cpu")
    path.write_bytes(bytes(data[:-4]))
    _one_line("model.safetensors: ", moegpt.load, folder, verify=False)  # a size is always checked


def test_generate_without_a_tokenizer_says_what_to_copy(folder: Path, capsys) -> None:
    assert main(["generate", str(folder), "--prompt", "def f"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moegpt: error: {folder}: no tokenizer.json") and err.count("\n") == 1
