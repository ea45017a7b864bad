"""`moegpt convert model.gguf DST`: a small Llama (and a Mixtral) written with gguf's own writer
the way llama.cpp's converter writes it (q/k rows permuted, experts stacked, F32 or Q8_0),
converted, against the Hugging Face model it came from and against transformers' own GGUF
loader."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import moegpt  # noqa: E402
from moegpt.cli import main  # noqa: E402
from moegpt.convert import convert  # noqa: E402
from moegpt.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from moegpt.errors import UserError  # noqa: E402
from moegpt.serve.engine import Engine  # noqa: E402
from moegpt.serve.sequence import SamplingParams  # noqa: E402

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary pairs adjacent)."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@pytest.fixture(scope="module")
def tokenizer():
    source = Path(torch.__file__).with_name("functional.py").read_text()
    return train_tokenizer([source], vocab_size=384)


def llama(tokenizer, rope: dict | None = None) -> torch.nn.Module:
    """A small random Llama; ``rope``: its rotary scaling (Hugging Face's keys)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", **(rope or {}), "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf_model(tokenizer):
    return llama(tokenizer)


def write_gguf(
    path: Path,
    model,
    tokenizer,
    qtype=None,
    arch: str = "llama",
    pre: str | None = None,
    metadata: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    c = model.config
    writer = gguf.GGUFWriter(path, arch)
    if metadata is not None:
        metadata(writer)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(10000.0)  # the config's default
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    spec = json.loads(tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    writer.add_eos_token_id(tokenizer.token_to_id("<|im_end|>"))
    writer.add_chat_template(TEMPLATE)
    if getattr(c, "num_local_experts", None):  # Mixtral, as llama.cpp writes it
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    kv_heads = c.num_key_value_heads
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name.endswith("experts.gate_up_proj"):  # (experts, 2 x hidden, d): two stacks
            layer = name.split(".")[2]
            gate, up = np.split(array, 2, axis=1)
            writer.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
            writer.add_tensor(f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(up))
            continue
        if name.endswith("experts.down_proj"):
            writer.add_tensor(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", array)
            continue
        if name.endswith("q_proj.weight"):
            array = permute(array, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = permute(array, kv_heads)
        target = names.get_name(name, try_suffixes=(".weight",))
        if qtype is not None and array.ndim == 2:
            writer.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", [None, "Q8_0"])
def test_a_gguf_converts_to_the_model_it_holds(hf_model, tokenizer, tmp_path: Path, qtype):
    quant = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None
    path = write_gguf(tmp_path / "model.gguf", hf_model, tokenizer, quant)
    assert main(["convert", str(path), str(tmp_path / "m")]) in (0, None)
    ours = moegpt.load(tmp_path / "m")
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", torch_dtype=torch.float32
    ).eval()
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 20))
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
        if qtype is None:  # unquantised: the very model that was written
            torch.testing.assert_close(logits, hf_model(ids).logits, rtol=1e-4, atol=1e-4)
        greedy = theirs.generate(ids[:1, :8], max_new_tokens=12, do_sample=False)
    engine_out = Engine(ours).generate(
        [ids[0, :8].tolist()], SamplingParams(max_tokens=12, temperature=0)
    )
    assert engine_out[0][0].token_ids == greedy[0, 8:].tolist()


def test_a_gguf_with_experts_converts_to_the_mixtral_it_holds(tokenizer, tmp_path: Path):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    mixtral = transformers.MixtralForCausalLM(config).eval()
    path = write_gguf(tmp_path / "mixtral.gguf", mixtral, tokenizer)
    convert(path, tmp_path / "m")
    ours = moegpt.load(tmp_path / "m")
    assert (ours.config.n_experts, ours.config.top_k, ours.config.expert_hidden_size) == (4, 2, 48)
    ids = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, mixtral(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_tokenizer_and_chat_template_come_along(hf_model, tokenizer, tmp_path: Path):
    path = write_gguf(tmp_path / "model.gguf", hf_model, tokenizer)
    convert(path, tmp_path / "m")
    rebuilt = load_tokenizer(tmp_path / "m" / "tokenizer.json")
    text = "def f(x):\n    return torch.relu(x) + 1  # <|im_end|> as text"
    assert rebuilt.encode(text).ids == tokenizer.encode(text).ids
    assert rebuilt.encode("<|im_start|>").ids == [tokenizer.token_to_id("<|im_start|>")]
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE and config["eos_token"] == "<|im_end|>"


def test_an_architecture_moegpt_cannot_express_is_one_line(hf_model, tokenizer, tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", hf_model, tokenizer, arch="bert")
    with pytest.raises(UserError, match="GGUF architecture 'bert' cannot be expressed"):
        convert(path, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_smollm_pre_tokenization_splits_every_digit(hf_model, tokenizer, tmp_path: Path):
    write_gguf(tmp_path / "smol.gguf", hf_model, tokenizer, pre="smollm")
    convert(tmp_path / "smol.gguf", tmp_path / "smol")
    rebuilt = load_tokenizer(tmp_path / "smol" / "tokenizer.json")
    assert rebuilt.encode("x = 2024").tokens[-4:] == ["2", "0", "2", "4"]
    write_gguf(tmp_path / "odd.gguf", hf_model, tokenizer, pre="falcon")
    with pytest.raises(UserError, match="pre-tokenizer 'falcon' is not rebuilt yet"):
        convert(tmp_path / "odd.gguf", tmp_path / "odd")
    assert not (tmp_path / "odd").exists()


def linear_keys(writer: gguf.GGUFWriter) -> None:
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(4.0)


def yarn_keys(writer: gguf.GGUFWriter) -> None:
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(4.0)
    writer.add_rope_scaling_orig_ctx_len(32)
    writer.add_rope_scaling_yarn_beta_fast(16.0)
    writer.add_rope_scaling_yarn_beta_slow(2.0)


@pytest.mark.parametrize(
    "scaling, keys",
    [
        ({"rope_type": "linear", "factor": 4.0}, linear_keys),
        (
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
            },
            yarn_keys,
        ),
    ],
)
def test_a_ggufs_rotary_scaling_comes_along(tokenizer, tmp_path: Path, scaling, keys) -> None:
    """llama.cpp's rope.scaling.* keys become the model's rope_scaling: the same logits as
    the Hugging Face model the file was written from, well past the original context."""
    reference = llama(tokenizer, scaling)
    path = write_gguf(tmp_path / "scaled.gguf", reference, tokenizer, metadata=keys)
    convert(path, tmp_path / "m")
    ours = moegpt.load(tmp_path / "m")
    assert ours.config.rope_scaling.type == scaling["rope_type"]
    ids = torch.randint(0, reference.config.vocab_size, (2, 120))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_scalings_moegpt_cannot_express_are_one_line(hf_model, tokenizer, tmp_path: Path):
    def freqs(writer: gguf.GGUFWriter) -> None:  # llama.cpp's Llama 3.1: a factor per pair
        writer.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))

    def longrope(writer: gguf.GGUFWriter) -> None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)

    def deepseek(writer: gguf.GGUFWriter) -> None:
        yarn_keys(writer)
        writer.add_rope_scaling_attn_factors(0.75)

    for name, metadata, said in [
        ("freqs", freqs, "per-frequency rotary factors (rope_freqs"),
        ("longrope", longrope, "rotary scaling 'longrope' is not supported"),
        ("deepseek", deepseek, "llama.rope.scaling.attn_factor = 0.75 has no moegpt"),
    ]:
        path = write_gguf(tmp_path / f"{name}.gguf", hf_model, tokenizer, metadata=metadata)
        with pytest.raises(UserError, match=re.escape(said)):
            convert(path, tmp_path / name)
        assert not (tmp_path / name).exists()
