"""Rotary scalings against transformers' own rope initialisation and models: the speeds and
attention factor of each type, equal logits past the original context after `moegpt convert`
(both ways), the factor applied once whether decoding is cached or not, and bad values."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

import moegpt
from moegpt.cli import main
from moegpt.config import ModelConfig, RopeScaling, load_config
from moegpt.convert import convert
from moegpt.errors import ConfigError, UserError
from moegpt.model import Transformer
from moegpt.model.kv_cache import KVCache
from moegpt.model.rope import rope_cos_sin, rope_frequencies, rope_inverse_frequencies
from tests.conftest import small_config
from tests.test_convert import SHAPE as CONVERT_SHAPE

transformers = pytest.importorskip("transformers")
rope_utils = pytest.importorskip("transformers.modeling_rope_utils")


def hf_rope(head_dim: int, max_pos: int, params: dict) -> tuple[torch.Tensor, float]:
    """transformers' own initialisation for ``params`` (a ``rope_parameters`` dict)."""
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )
    kind = params["rope_type"]
    seq_len = params.pop("_seq_len", None)
    return rope_utils.ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"), seq_len=seq_len)


SHAPES = [(32, 10000.0, 64), (64, 500000.0, 2048), (128, 10000.0, 8192)]  # head_dim, theta, orig


@pytest.mark.parametrize("head_dim,theta,original", SHAPES)
@pytest.mark.parametrize("factor", [2.0, 4.0, 8.0])
def test_speeds_and_attention_factor_equal_transformers(
    head_dim: int, theta: float, original: int, factor: float
) -> None:
    long = int(original * factor)
    cases = {
        "linear": ({"rope_type": "linear", "factor": factor}, {}),
        "yarn": (
            {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original},
            {"original_max_seq_len": original},
        ),
        "llama3": (
            {
                "rope_type": "llama3",
                "factor": factor,
                "original_max_position_embeddings": original,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
            {"original_max_seq_len": original},
        ),
        # transformers' only NTK-aware rule is the dynamic one; with its factor at 1 and the
        # sequence at s times the original context, its base is theta * s^(d / (d - 2)).
        "ntk": ({"rope_type": "dynamic", "factor": 1.0, "_seq_len": long}, {}),
    }
    for kind, (params, extra) in cases.items():
        want, want_factor = hf_rope(head_dim, original, {**params, "rope_theta": theta})
        scaling = RopeScaling(type=kind, factor=factor, **extra)
        got, got_factor = rope_frequencies(head_dim, theta, scaling)
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0, msg=kind)
        assert got_factor == pytest.approx(want_factor, rel=1e-12), kind
    assert rope_frequencies(head_dim, theta, RopeScaling("yarn", factor, original))[1] == (
        pytest.approx(0.1 * math.log(factor) + 1)
    )


@pytest.mark.parametrize("kind", ["none", "linear", "ntk", "yarn", "llama3"])
def test_factor_one_is_exactly_unscaled(kind: str) -> None:
    scaling = RopeScaling(type=kind, factor=1.0, original_max_seq_len=64)
    speeds, attention = rope_frequencies(64, 10000.0, scaling)
    assert torch.equal(speeds, rope_inverse_frequencies(64, 10000.0)) and attention == 1.0
    positions = torch.arange(300)
    plain = rope_cos_sin(positions, 64, 10000.0)
    for got, want in zip(rope_cos_sin(positions, 64, 10000.0, scaling), plain, strict=True):
        assert torch.equal(got, want)


# test_convert's small Llama/Mixtral, with one K/V head and its base in rope_parameters.
SHAPE = {k: v for k, v in CONVERT_SHAPE.items() if k != "rope_theta"} | dict(
    num_hidden_layers=2,
    num_key_value_heads=1,
    head_dim=16,  # Mixtral's config leaves it None, which transformers' yarn cannot read
)
ORIGINAL = 32
HF_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}


def hf_model(arch: str, params: dict) -> torch.nn.Module:
    rope = {**params, "rope_theta": 5000.0}
    if arch == "llama":
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**SHAPE, rope_parameters=rope)
        )
    config = transformers.MixtralConfig(
        **SHAPE, rope_parameters=rope, num_local_experts=4, num_experts_per_tok=2
    )
    return transformers.MixtralForCausalLM(config)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("kind", sorted(HF_SCALINGS))
def test_converted_models_equal_hf_past_the_original_context(
    tmp_path: Path, arch: str, kind: str
) -> None:
    torch.manual_seed(0)
    reference = hf_model(arch, HF_SCALINGS[kind]).eval()
    hf_dir, ours, back = tmp_path / "hf", tmp_path / "moegpt", tmp_path / "back"
    reference.save_pretrained(hf_dir)
    assert main(["convert", str(hf_dir), str(ours)]) == 0
    model = moegpt.load(ours)
    assert model.config.rope_scaling.type == kind and model.config.rope_scaling.factor == 4.0
    tokens = torch.randint(0, 101, (2, 4 * ORIGINAL - 8))  # well past the original 32
    with torch.no_grad():
        expected = reference(tokens).logits
        got = model(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)

    assert main(["convert", str(ours), str(back)]) == 0  # and back: the same rope parameters
    again = type(reference).from_pretrained(back).config.rope_parameters
    for key, value in HF_SCALINGS[kind].items():
        assert again[key] == value, key
    # ... also under the older key, which transformers 4 and llama.cpp's converter read
    older = json.loads((back / "config.json").read_text())["rope_scaling"]
    assert older == {**HF_SCALINGS[kind], "type": kind}


def test_ntk_converts_to_hf_as_the_base_it_amounts_to(tmp_path: Path) -> None:
    """Hugging Face has no fixed NTK type: the HF folder gets the enlarged base, and the same
    logits."""
    config = small_config(
        max_seq_len=128, rope_scaling=RopeScaling(type="ntk", factor=4.0), n_experts=4
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ours, hf_dir = tmp_path / "moegpt", tmp_path / "hf"
    moegpt.save_model(model, ours)
    assert main(["convert", str(ours), str(hf_dir), "--to", "mixtral"]) == 0
    reference = transformers.MixtralForCausalLM.from_pretrained(hf_dir).eval()
    head_dim = config.head_dim
    assert reference.config.rope_parameters["rope_type"] == "default"
    theta = reference.config.rope_parameters["rope_theta"]
    assert theta == pytest.approx(config.rope_theta * 4.0 ** (head_dim / (head_dim - 2)))
    tokens = torch.randint(0, config.vocab_size, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).logits, reference(tokens).logits, rtol=0, atol=1e-4
        )


def test_dynamic_ntk_is_refused_with_one_line(tmp_path: Path, capsys) -> None:
    reference = hf_model("llama", {"rope_type": "dynamic", "factor": 2.0})
    reference.save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' own progress bars
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'dynamic'" in err[0] and "'ntk'" in err[0]
    assert not (tmp_path / "out").exists()


def test_cached_decoding_applies_the_yarn_factor_once() -> None:
    """Token by token through the KV cache equals the full forward: the attention factor
    rides on the cos/sin tables both paths build, not on a second multiplication."""
    config = small_config(
        max_seq_len=64, rope_scaling=RopeScaling("yarn", 4.0, original_max_seq_len=16)
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 40))
    with torch.no_grad():
        full = model(tokens).logits[0]
        cache = KVCache.for_model(model, batch_size=1)
        steps = [model(tokens[:, i : i + 1], cache=cache).logits[0, 0] for i in range(40)]
    torch.testing.assert_close(torch.stack(steps), full, rtol=0, atol=1e-5)
    unscaled = Transformer(dataclasses.replace(config, rope_scaling=RopeScaling())).eval()
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (unscaled(tokens).logits[0] - full).abs().max() > 1e-3  # the factor matters


def test_bad_rope_scaling_values_name_their_field() -> None:
    def error(**scaling: object) -> str:
        with pytest.raises(ConfigError) as e:
            load_config(overrides={f"model.rope_scaling.{k}": str(v) for k, v in scaling.items()})
        return str(e.value)

    assert error(type="linear", factor=0.5).startswith("model.rope_scaling.factor: must be at")
    assert error(type="yarn", factor=4).startswith("model.rope_scaling.original_max_seq_len:")
    long = error(type="yarn", factor=4, original_max_seq_len=100000)
    assert long.startswith("model.rope_scaling.original_max_seq_len: 100000 exceeds model.max")
    beta = error(type="yarn", original_max_seq_len=64, beta_fast=1)
    assert beta.startswith("model.rope_scaling.beta_fast: 1.0 must exceed beta_slow")
    assert error(type="cubic").startswith("model.rope_scaling.type: expected one of")
    assert error(factr=2).startswith("model.rope_scaling.factr: unknown key (did you mean")
    assert ModelConfig(rope_scaling="none").rope_scaling == RopeScaling()  # older folders


@pytest.mark.parametrize(
    "edit, said",
    [
        ({"rope_theta": "abc"}, "rope_theta must be a number, got 'abc'"),
        ({"rope_parameters": [1, 2]}, "rope_parameters must be an object, got [1, 2]"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": "1"}},
            "rope mscale must be a number, got '1'",
        ),
    ],
)
def test_malformed_hf_rope_settings_are_one_line(tmp_path: Path, edit: dict, said: str) -> None:
    hf_dir = tmp_path / "hf"
    hf_model("llama", HF_SCALINGS["linear"]).save_pretrained(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("rope_parameters", None)
    (hf_dir / "config.json").write_text(json.dumps(config | edit))
    with pytest.raises(UserError, match="^" + re.escape(f"{hf_dir / 'config.json'}: {said}")):
        convert(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_scalings_that_cannot_compute_are_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match="^model.rope_scaling: ntk needs a head_dim above 2"):
        small_config(d_model=8, n_heads=4, rope_scaling=RopeScaling(type="ntk", factor=2.0))
    with pytest.raises(ConfigError, match="^model.rope_theta: yarn needs a base above 1, got 1"):
        small_config(
            rope_theta=1.0,
            max_seq_len=128,
            rope_scaling=RopeScaling(type="yarn", factor=2.0, original_max_seq_len=64),
        )
