"""Peer check: Hugging Face Mixtral and Llama models converted to moegpt give the same logits,
and converting back gives identical tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moegpt
from moegpt.cli import main
from moegpt.convert import convert
from moegpt.errors import UserError

transformers = pytest.importorskip("transformers")

SHAPE = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=128,
    rope_theta=5000.0,
    initializer_range=0.1,  # larger than the default so logits are far from zero
)


def hf_mixtral(kv_heads: int) -> torch.nn.Module:
    config = transformers.MixtralConfig(
        **SHAPE, num_key_value_heads=kv_heads, num_local_experts=4, num_experts_per_tok=2
    )
    return transformers.MixtralForCausalLM(config).eval()


def hf_llama(kv_heads: int, tied: bool) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        **SHAPE, num_key_value_heads=kv_heads, tie_word_embeddings=tied
    )
    return transformers.LlamaForCausalLM(config).eval()


CASES = {
    "mixtral-mqa": lambda: hf_mixtral(1),
    "mixtral-gqa": lambda: hf_mixtral(2),
    "llama-gqa": lambda: hf_llama(2, tied=False),
    "llama-mqa-tied": lambda: hf_llama(1, tied=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_checkpoint_converts_to_equal_logits_and_back_to_identical_tensors(
    tmp_path: Path, case: str
) -> None:
    torch.manual_seed(0)
    reference = CASES[case]()
    hf_dir, ours_dir, back_dir = tmp_path / "hf", tmp_path / "moegpt", tmp_path / "back"
    reference.save_pretrained(hf_dir)

    assert main(["convert", str(hf_dir), str(ours_dir)]) == 0
    model = moegpt.load(ours_dir)
    assert not model.training
    assert model.config.n_experts == (4 if case.startswith("mixtral") else 0)

    tokens = torch.randint(0, 101, (2, 23))
    with torch.no_grad():
        expected = reference(tokens).logits
        got = model(tokens).logits
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)

    assert main(["convert", str(ours_dir), str(back_dir)]) == 0
    original, again = (
        load_file(hf_dir / "model.safetensors"),
        load_file(back_dir / "model.safetensors"),
    )
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name

    # The converted-back folder is a valid Hugging Face checkpoint with the same behaviour.
    reloaded = type(reference).from_pretrained(back_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, expected, rtol=0, atol=1e-5)


def test_mixtral_routing_and_aux_coefficient_survive_conversion(tmp_path: Path) -> None:
    reference = hf_mixtral(1)
    reference.save_pretrained(tmp_path / "hf")
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")])
    config = moegpt.load(tmp_path / "ours").config
    assert (config.n_experts, config.top_k, config.n_kv_heads) == (4, 2, 1)
    assert config.rope_theta == 5000.0
    assert config.aux_loss_coef == pytest.approx(reference.config.router_aux_loss_coef * 2)


def test_tokenizer_files_travel_along(tmp_path: Path) -> None:
    hf_llama(1, tied=False).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")])
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def test_moegpt_to_hf_refuses_what_the_target_cannot_hold(tmp_path: Path) -> None:
    from tests.conftest import small_config

    gelu = moegpt.Transformer(small_config(activation="gelu"))
    moegpt.save_model(gelu, tmp_path / "gelu")
    with pytest.raises(UserError, match="model.activation = 'gelu': mixtral needs swiglu"):
        convert(tmp_path / "gelu", tmp_path / "out")
    mixed = moegpt.Transformer(small_config(first_k_dense=1))
    moegpt.save_model(mixed, tmp_path / "mixed")
    with pytest.raises(UserError, match="mixtral needs every layer to be MoE"):
        convert(tmp_path / "mixed", tmp_path / "out")
    with pytest.raises(UserError, match="cannot be written as llama"):
        convert(tmp_path / "mixed", tmp_path / "out", to="llama")
    assert not (tmp_path / "out").exists()


def test_bad_sources_fail_with_one_line_and_leave_nothing(tmp_path: Path, capsys) -> None:
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert "unsupported model_type 'gpt2'" in capsys.readouterr().err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({**SHAPE, "model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    assert main(["convert", str(pickled), str(tmp_path / "out")]) == 2
    assert "pickles are refused" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_existing_destination_is_kept_unless_forced(tmp_path: Path, capsys) -> None:
    hf_llama(1, tied=False).save_pretrained(tmp_path / "hf")
    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert main(["convert", str(tmp_path / "hf"), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "precious"
    # --force replaces a model folder's own files only; this folder is not one
    assert main(["convert", str(tmp_path / "hf"), str(dst), "--force"]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "precious"
    (dst / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", str(tmp_path / "hf"), str(dst), "--force"]) == 0
    assert (dst / "keep.txt").read_text() == "precious"
    assert moegpt.load(dst).config.n_experts == 0


def _logits_match(reference: torch.nn.Module, ours: Path, atol: float) -> None:
    tokens = torch.randint(0, 101, (2, 11))
    model = moegpt.load(ours)
    with torch.no_grad():
        expected = reference(tokens).logits.float()
        got = model(tokens).logits.float()
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_sharded_checkpoints_are_read(tmp_path: Path) -> None:
    reference = hf_mixtral(1)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    _logits_match(reference, tmp_path / "ours", atol=1e-4)


def test_fused_expert_layout_is_read(tmp_path: Path) -> None:
    """Newer transformers hold Mixtral experts fused (gate_up_proj, down_proj): accept both."""
    reference = hf_mixtral(2)
    reference.save_pretrained(tmp_path / "hf")
    legacy = load_file(tmp_path / "hf" / "model.safetensors")
    fused = {}
    for name, tensor in legacy.items():
        if ".experts." not in name:
            fused[name.replace(".block_sparse_moe.", ".mlp.")] = tensor
    for layer in range(SHAPE["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        w = {
            n: torch.stack([legacy[f"{prefix}.{e}.{n}.weight"] for e in range(4)])
            for n in ("w1", "w2", "w3")
        }
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], 1)
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = w["w2"]
    save_file(fused, tmp_path / "hf" / "model.safetensors")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    _logits_match(reference, tmp_path / "ours", atol=1e-4)


def test_bf16_checkpoints_keep_their_dtype(tmp_path: Path) -> None:
    reference = hf_llama(1, tied=False).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf")
    main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")])
    assert {p.dtype for p in moegpt.load(tmp_path / "ours").parameters()} == {torch.bfloat16}
    main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")])
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    original = load_file(tmp_path / "hf" / "model.safetensors")
    again = load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.equal(t, again[n]) for n, t in original.items())


def test_incomplete_hf_config_is_named(tmp_path: Path, capsys) -> None:
    hf_llama(1, tied=False).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["num_attention_heads"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    assert "num_attention_heads is missing or not an integer" in capsys.readouterr().err
