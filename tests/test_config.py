"""Config loading: every validation rule gives one line naming the field; overrides are typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moegpt.config import Config, load_config, parse_overrides, to_toml
from moegpt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"  # 6 heads, 1 KV head, 8 experts top-2, 4 layers


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.n_layers": "0"}, "model.n_layers: must be positive, got 0"),
        ({"model.vocab_size": "-3"}, "model.vocab_size: must be positive, got -3"),
        ({"model.d_model": "100"}, "model.d_model: 100 is not divisible by model.n_heads (6)"),
        ({"model.n_kv_heads": "4"}, "model.n_heads: 6 is not divisible by model.n_kv_heads (4)"),
        ({"model.d_model": "18"}, "model.d_model: head_dim (d_model / n_heads = 3) must be even"),
        ({"model.top_k": "9"}, "model.top_k: 9 exceeds model.n_experts (8)"),
        ({"model.top_k": "0"}, "model.top_k: must be at least 1 with experts, got 0"),
        ({"model.n_experts": "-1"}, "model.n_experts: must be >= 0, got -1"),
        ({"model.first_k_dense": "5"}, "model.first_k_dense: 5 exceeds model.n_layers (4)"),
        ({"model.capacity_factor": "-1"}, "model.capacity_factor: must be >= 0, got -1.0"),
        ({"model.norm_eps": "0"}, "model.norm_eps: must be positive, got 0.0"),
        ({"model.norm_eps": "nan"}, "model.norm_eps: must be a finite number, got nan"),
        ({"model.capacity_factor": "inf"}, "model.capacity_factor: must be a finite number"),
        ({"model.aux_loss_coef": "-0.1"}, "model.aux_loss_coef: must be >= 0, got -0.1"),
        ({"model.z_loss_coef": "-1"}, "model.z_loss_coef: must be >= 0, got -1.0"),
        ({"model.expert_hidden": "-8"}, "model.expert_hidden: must be >= 0, got -8"),
        ({"model.max_seq_len": "0"}, "model.max_seq_len: must be positive, got 0"),
        ({"model.rope_theta": "-1"}, "model.rope_theta: must be positive, got -1.0"),
        ({"model.init_std": "0"}, "model.init_std: must be positive, got 0.0"),
        ({"model.ffn_hidden": "0"}, "model.ffn_hidden: must be positive, got 0"),
        ({"train.warmup_steps": "-1"}, "train.warmup_steps: must be >= 0, got -1"),
        ({"train.beta1": "-0.5"}, "train.beta1: must be in [0, 1), got -0.5"),
        ({"train.steps": "0"}, "train.steps: must be positive, got 0"),
        ({"parallel.dp_shard": "0"}, "parallel.dp_shard: must be positive, got 0"),
        ({"parallel.tp": "-2"}, "parallel.tp: must be positive, got -2"),
        ({"serve.max_batch_size": "0"}, "serve.max_batch_size: must be positive, got 0"),
        ({"serve.num_kv_blocks": "-1"}, "serve.num_kv_blocks: must be >= 0, got -1"),
        ({"data.seq_len": "0"}, "data.seq_len: must be positive, got 0"),
        (
            {"model.activation": "relu"},
            "model.activation: expected one of 'swiglu', 'gelu', got 'relu' (str)",
        ),
        ({"model.n_layers": "four"}, "model.n_layers: expected an integer, got 'four'"),
        (
            {"model.tie_embeddings": "maybe"},
            "model.tie_embeddings: expected a boolean, got 'maybe'",
        ),
        ({"train.lr": "fast"}, "train.lr: expected a number, got 'fast'"),
        ({"train.lr": "0"}, "train.lr: must be positive, got 0.0"),
        ({"train.beta2": "1"}, "train.beta2: must be in [0, 1), got 1.0"),
        ({"train.min_lr_ratio": "2"}, "train.min_lr_ratio: must be in [0, 1], got 2.0"),
        (
            {"train.global_batch_size": "10"},
            "train.global_batch_size: 10 is not a multiple of train.micro_batch_size (8)",
        ),
        ({"serve.port": "70000"}, "serve.port: must be in 1..65535, got 70000"),
        ({"serve.block_size": "0"}, "serve.block_size: must be positive, got 0"),
        ({"data.seq_len": "1024"}, "data.seq_len: 1024 exceeds model.max_seq_len (512)"),
        ({"parallel.tp": "4"}, "parallel.tp: 4 does not divide model.n_heads (6)"),
        (
            {"parallel.ep": "3", "parallel.dp_shard": "3"},
            "parallel.ep: 3 does not divide model.n_experts (8)",
        ),
        ({"parallel.ep": "2"}, "parallel.ep: 2 must divide parallel.dp_shard (1)"),
        (
            {"parallel.ep": "2", "parallel.dp_shard": "2", "model.n_experts": "0"},
            "parallel.ep: 2 needs experts, but model.n_experts is 0",
        ),
        (
            {"parallel.pp": "5", "parallel.pp_schedule": "gpipe"},
            "parallel.pp: 5 pipeline stages exceed model.n_layers (4)",
        ),
        (
            {
                "parallel.pp": "2",
                "parallel.pp_microbatches": "2",
                "parallel.pp_schedule": "interleaved_1f1b",
                "model.n_layers": "3",
            },
            "parallel.pp: 4 pipeline stages exceed model.n_layers (3)",
        ),
        (
            {"parallel.pp": "2", "parallel.pp_microbatches": "2", "model.tie_embeddings": "true"},
            "parallel.pp: tied embeddings would need the embedding",
        ),
        ({"parallel.pp_schedule": "interleaved_1f1b"}, "parallel.pp_schedule: interleaved_1f1b"),
        ({"parallel.pp": "2"}, "parallel.pp_microbatches: 1f1b needs at least one micro-batch"),
        (
            {
                "parallel.pp": "2",
                "parallel.pp_microbatches": "3",
                "parallel.pp_schedule": "interleaved_1f1b",
            },
            "parallel.pp_microbatches: interleaved_1f1b runs micro-batches in rounds",
        ),
        (
            {"parallel.tp": "2", "model.n_kv_heads": "3"},
            "parallel.tp: 2 does not divide model.n_kv",
        ),
        (
            {"parallel.zero1": "true", "parallel.dp_shard": "2"},
            "parallel.zero1: shards optimizer states",
        ),
        (
            {"parallel.cp": "2", "parallel.tp": "2"},
            "parallel.cp: context parallelism composes with data parallelism only, not "
            "parallel.tp = 2",
        ),
        (
            {"parallel.cp": "2", "parallel.zero1": "true"},
            "parallel.cp: context parallelism shards with FSDP2",
        ),
        (
            {"parallel.cp": "2", "data.document_mask": "true"},
            "data.document_mask: ring attention (parallel.cp = 2) runs causal attention only",
        ),
        (
            {"parallel.cp": "3", "data.seq_len": "256"},
            "data.seq_len: 256 does not split into 2 x parallel.cp = 6 equal chunks",
        ),
        (
            {"parallel.cp": "2"},
            "train.dtype: ring attention (parallel.cp) over shared K/V heads runs on the flash",
        ),
        ({"data.long_doc_repeat": "0"}, "data.long_doc_repeat: must be positive, got 0"),
        ({"serve.tp": "4"}, "serve.tp: 4 does not divide model.n_heads (6)"),
        ({"serve.pp": "9"}, "serve.pp: 9 stages exceed model.n_layers (4)"),
        ({"parallel.pp_schedule": "zb"}, "parallel.pp_schedule: expected one of 'gpipe', "),
        (
            {"parallel.reduce_dtype": "float16"},
            "parallel.reduce_dtype: expected one of 'float32', 'bfloat16'",
        ),
        ({"model.n_layer": "3"}, "model.n_layer: unknown key (did you mean model.n_layers?)"),
        ({"modle.n_layers": "3"}, "modle: unknown section (did you mean model?)"),
    ],
)
def test_each_rule_names_field_and_reason(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[model]\nn_layers = '4'\n", "model.n_layers: expected an integer, got '4' (str)"),
        ("[model]\nn_layers = true\n", "model.n_layers: expected an integer, got True (bool)"),
        ("[model]\nrope_theta = 'x'\n", "model.rope_theta: expected a number, got 'x' (str)"),
        ("[train]\ncompile = 1\n", "train.compile: expected a boolean, got 1 (int)"),
        ("[model]\nheads = 4\n", "model.heads: unknown key (did you mean model.n_heads?)"),
        ("[trian]\nlr = 1.0\n", "trian: unknown section (did you mean train?)"),
        ("model = 3\n", "model: expected a table of settings, got 3"),
    ],
)
def test_toml_values_are_type_checked(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(message), info.value


def test_strings_with_control_characters_round_trip(tmp_path: Path) -> None:
    config = load_config(None, {"data.tokenizer": 'odd "name"\n\tpath\\x'})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.toml: config file not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(broken)
    broken.write_bytes(b"[model]\nn_layers = 2 # \xff\xfe\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(broken)


def test_overrides_are_typed_and_win_over_the_file() -> None:
    config = load_config(
        TINY,
        [
            "--model.n_layers",
            "2",
            "--train.lr=3e-4",
            "--model.tie_embeddings",
            "yes",
            "--data.tokenizer",
            "tok.json",
        ],
    )
    assert config.model.n_layers == 2
    assert config.train.lr == 3e-4
    assert config.model.tie_embeddings is True
    assert config.data.tokenizer == "tok.json"
    assert config.model.d_model == 192  # from the file


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="^--model.n_layers: missing value$"):
        parse_overrides(["--model.n_layers"])
    with pytest.raises(ConfigError, match="^n_layers: expected a dotted override"):
        parse_overrides(["n_layers", "3"])


def test_int_is_accepted_where_a_float_is_declared(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nlr = 1\n")
    assert load_config(path).train.lr == 1.0


@pytest.mark.parametrize("name", ["tiny", "small-moe", "gpt4-1.8t"])
def test_shipped_recipes_load_and_round_trip_through_toml(tmp_path: Path, name: str) -> None:
    config = load_config(ROOT / "configs" / f"{name}.toml")
    path = tmp_path / "again.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_gpt4_recipe_is_the_seed_model() -> None:
    m = load_config(ROOT / "configs" / "gpt4-1.8t.toml").model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim) == (120, 15360, 120, 1, 128)
    assert (m.n_experts, m.top_k) == (16, 2)


def test_configs_are_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.model.n_layers = 3  # type: ignore[misc]


def test_cli_reports_config_errors_in_one_line_with_status_2() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moegpt.cli",
            "model",
            "summary",
            "--config",
            str(TINY),
            "--model.top_k",
            "9",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "moegpt: error: model.top_k: 9 exceeds model.n_experts (8)"
    assert "Traceback" not in result.stderr


def test_sources_are_an_array_of_tables(tmp_path: Path) -> None:
    path = tmp_path / "mix.toml"
    path.write_text(
        '[[data.sources]]\nname = "a"\npath = "a/*.txt"\nepochs = 3\nweight = 1\n'
        '[[data.sources]]\nname = "b"\nkind = "code"\npath = "b.jsonl"\nweight = 2\n'
    )
    config = load_config(path, ["--data.sources.1.epochs", "5"])
    assert [(s.name, s.kind, s.epochs, s.weight) for s in config.data.sources] == [
        ("a", "text", 3, 1.0),
        ("b", "code", 5, 2.0),
    ]
    again = tmp_path / "again.toml"
    again.write_text(to_toml(config))
    assert load_config(again) == config


def test_default_sources_are_stdlib_code_four_times_and_text_twice() -> None:
    sources = load_config(None).data.sources
    assert [(s.name, s.path, s.epochs) for s in sources] == [
        ("code", "stdlib:code", 4),
        ("text", "stdlib:text", 2),
    ]
    assert load_config(None, ["--data.sources.0.epochs", "1"]).data.sources[0].epochs == 1


@pytest.mark.parametrize(
    ("toml", "overrides", "message"),
    [
        (
            '[[data.sources]]\nname = "a"\npath = "x"\nepochs = 0\n',
            [],
            "data.sources[0].epochs: must be positive, got 0",
        ),
        (
            '[[data.sources]]\nname = "a"\npath = "x"\n[[data.sources]]\nname = "b"\npath = ""\n',
            [],
            "data.sources[1].path: must name files, a folder or a built-in corpus",
        ),
        (
            '[[data.sources]]\nname = "a b"\npath = "x"\n',
            [],
            "data.sources[0].name: must be non-empty letters, digits, - or _, got 'a b'",
        ),
        (
            '[[data.sources]]\nname = "a"\npath = "x"\nepoch = 2\n',
            [],
            "data.sources[0].epoch: unknown key (did you mean data.sources.epochs?)",
        ),
        (
            '[[data.sources]]\nname = "a"\npath = "x"\n[[data.sources]]\nname = "a"\npath = "y"\n',
            [],
            "data.sources: source name 'a' is used twice",
        ),
        (
            '[[data.sources]]\nname = "a"\npath = "x"\nval_fraction = 1.0\n',
            [],
            "data.sources[0].val_fraction: must be in [0, 1), got 1.0",
        ),
        (
            '[[data.sources]]\nname = "a"\npath = "x"\ninterleave = 4\n',
            [],
            "data.sources[0].interleave: interleaves image_text items; this source is text",
        ),
        (
            '[[data.sources]]\nname = "a"\npath = "x"\ninterleave = 0\n',
            [],
            "data.sources[0].interleave: must be",
        ),
        (
            '[[data.sources]]\nname = "a"\npath = "stdlib:packages"\n'
            '[[data.sources]]\nname = "b"\npath = "stdlib:text"\n',
            [],
            "data.sources: stdlib:packages holds stdlib:code's files grouped by package; a "
            "mixture with it takes no other stdlib source",
        ),
        ("[data]\nsources = 3\n", [], "data.sources: expected a list of tables, got 3"),
        (
            '[[data.sources]]\nname = "a"\npath = "x"\nweight = 2\n'
            '[[data.sources]]\nname = "b"\npath = "y"\n',
            [],
            "data.sources: give every source a weight, or none",
        ),
        ("", ["--data.sources.7.epochs", "2"], "data.sources.7.epochs: no such entry (2 in "),
        ("", ["--data.sources.0.epoch", "2"], "data.sources.0.epoch: unknown key"),
    ],
)
def test_source_errors_name_the_entry(tmp_path: Path, toml, overrides, message) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert str(info.value).startswith(message), info.value


def test_the_built_in_defaults_are_the_tiny_recipe() -> None:
    assert load_config(None) == load_config(TINY)


@pytest.mark.parametrize(
    "stage, parent, path",
    [
        ("tiny-vision", "tiny", "stdlib:rendered"),
        ("tiny-vision-clip", "tiny", "stdlib:rendered"),
        ("small-moe-vision", "small-moe", "stdlib:rendered"),
        ("small-moe-vision-clip", "small-moe", "stdlib:rendered"),
        ("small-moe-vision", "small-moe", "stdlib:rendered-words"),
        ("small-moe-vision-clip", "small-moe", "stdlib:rendered-words"),
        ("tiny-sft", "tiny", "stdlib:instruct"),
    ],
)
def test_later_stages_hold_out_only_files_their_parent_never_trained_on(
    stage: str, parent: str, path: str
) -> None:
    """Rendered lines and instruct questions are keyed by file, as the parent's code and
    docstrings are (same seed): with a val_fraction at most the parent's exclusion threshold,
    everything a later stage evaluates on comes from files the parent language model did not
    train on, so an answer cannot be recall."""
    child = load_config(ROOT / "configs" / f"{stage}.toml").data
    elder = load_config(ROOT / "configs" / f"{parent}.toml").data
    (source,) = [s for s in child.sources if s.path == path]
    assert child.seed == elder.seed
    assert 0 < source.val_fraction <= elder.exclude_below
    assert {s.path for s in elder.sources} >= {"stdlib:code", "stdlib:text"}
