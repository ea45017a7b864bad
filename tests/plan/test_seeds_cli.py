"""`moegpt plan` on the seed's model: the published figures within 5%, the claims evaluated,
and one-line errors for impossible inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moegpt.cli import main
from moegpt.config import load_config
from moegpt.plan.seeds import seed_comparison

ROOT = Path(__file__).resolve().parents[2]
GPT4 = str(ROOT / "configs" / "gpt4-1.8t.toml")


@pytest.fixture(scope="module")
def seeds() -> dict:
    return seed_comparison(load_config(GPT4))


def figure(seeds: dict, prefix: str) -> dict:
    return next(r for r in seeds["figures"] if r["figure"].startswith(prefix))


@pytest.mark.parametrize(
    "prefix",
    [
        "total parameters",
        "active parameters per token",
        "forward FLOP per token",
        "training FLOPs",
        "days on 25,000 A100 at 32%",
        "days on 25,000 A100 at 36%",
        "cost at $1/A100-hour",
        "cost of 8,192 H100",
        "tokens per expert per batch",
    ],
)
def test_seed_figures_within_five_percent(seeds: dict, prefix: str) -> None:
    row = figure(seeds, prefix)
    assert 0.95 <= row["ratio"] <= 1.05, row
    assert row["note"]


def test_seed_figures_by_first_principles(seeds: dict) -> None:
    # 6 * N * D with N = 286.7B active minus the 1.54B lookup table and the norms
    assert figure(seeds, "training FLOPs")["computed"] == pytest.approx(
        3 * 2 * 285.16e9 * 13e12, rel=1e-3
    )
    assert figure(seeds, "tokens per expert")["computed"] == 60e6 * 2 / 16
    assert figure(seeds, "cost of 8,192 H100")["computed"] == pytest.approx(8192 * 55 * 24 * 2)
    assert "58% MFU" in figure(seeds, "cost of 8,192 H100")["note"]


def test_kv_cache_shows_why_mqa_matters(seeds: dict) -> None:
    rows = {(r["gpu"], r["context"]): r for r in seeds["kv_cache"]}
    for row in rows.values():
        assert row["per_sequence_mha"] == 120 * row["per_sequence_mqa"]
        assert row["max_batch_mqa"] > row["max_batch_mha"]
    # 2 (K, V) x 120 layers x 128 x 2 bytes = 61,440 bytes per token
    assert rows[("a100-40g", 8192)]["per_sequence_mqa"] == 61_440 * 8192
    assert (
        rows[("a100-40g", 32768)]["max_batch_mha"] < 5 < rows[("a100-40g", 32768)]["max_batch_mqa"]
    )
    assert rows[("a100-80g", 32768)]["max_batch_mqa"] > rows[("a100-40g", 32768)]["max_batch_mqa"]


def test_utilisation_needed_is_the_cost_ratio(seeds: dict) -> None:
    for row in seeds["inference_cost"]:
        if row["utilisation_needed"] is not None:
            assert row["reachable"]
            assert row["utilisation_needed"] == pytest.approx(
                row["cost_at_max_batch"] / row["seed_cost_per_1k"]
            )


def test_against_seeds_refuses_another_model(capsys) -> None:
    """The seeds' prose (6B per expert, their MFU range) is false for any other model."""
    tiny = str(ROOT / "configs" / "tiny.toml")
    assert main(["plan", "--config", tiny, "--against-seeds"]) == 2
    err = capsys.readouterr().err
    assert "--against-seeds: the seeds' figures describe one model" in err
    assert "model.n_layers 4" in err and err.count("\n") == 1
    mixtral = ["--model.n_layers", "32", "--model.d_model", "4096", "--model.n_heads", "32"]
    assert main(["plan", "--config", GPT4, "--against-seeds", *mixtral]) == 2
    assert "model.d_model 4096" in capsys.readouterr().err
    assert main(["plan", "--config", GPT4, "--against-seeds"]) == 0
    assert "SPEC.md" not in capsys.readouterr().out  # a file outside this repository


def test_claims_are_evaluated_not_asserted(seeds: dict) -> None:
    claims = {c["claim"][:12]: c for c in seeds["claims"]}
    assert claims["32k context "]["verdict"] == "holds only without MQA"
    assert claims["8k context c"]["verdict"] == "holds"
    assert "EP16" in claims["training on "]["verdict"]
    cost = seeds["inference_cost"]
    h100_fp8 = [r for r in cost if r["gpu"] == "h100-sxm" and r["precision"] == "fp8"]
    h100_bf16 = [r for r in cost if r["gpu"] == "h100-sxm" and r["precision"] == "bf16"]
    assert any(r["reachable"] for r in h100_fp8)
    assert not any(r["reachable"] and r["context"] == 8192 for r in h100_bf16)


def test_plan_json_schema(capsys) -> None:
    assert main(["plan", "--config", GPT4, "--json", "--against-seeds"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert list(plan) == [
        "schema_version",
        "inputs",
        "parameters",
        "flops",
        "training",
        "memory",
        "kv_cache",
        "inference",
        "vision",
        "batch_schedule",
        "learning_rate",
        "seed_comparison",
    ]
    assert plan["parameters"]["total"] == 1_872_147_993_600
    stage = plan["vision"]["stage"]  # the seed's ~2T-token vision stage
    assert stage["tokens"] == 2e12
    assert stage["flops"] == pytest.approx(2e12 * plan["vision"]["flops"]["stage_per_token"])
    assert plan["training"]["tokens_per_expert_per_batch"] == pytest.approx(7.5e6, rel=1e-3)


def test_plan_reverse_mfu_from_days(capsys) -> None:
    assert (
        main(
            [
                "plan",
                "--config",
                GPT4,
                "--gpu",
                "h100-sxm",
                "--gpus",
                "8160",
                "--days",
                "55",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    expected = plan["flops"]["training_total"] / (8160 * 989e12 * 55 * 86400)
    assert plan["training"]["mfu"] == pytest.approx(expected)


def test_plan_tables_render(capsys) -> None:
    assert main(["plan", "--config", str(ROOT / "configs/tiny.toml"), "--gpu", "a100-80g"]) == 0
    out = capsys.readouterr().out
    for title in ("Parameters", "FLOPs", "Training on", "Memory per GPU", "KV cache", "Decode"):
        assert title in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "-8"], "--gpus: must be positive, got -8"),
        (
            ["--gpus", "100"],
            "--gpus: 100 is not a multiple of parallel.tp x parallel.pp x parallel.cp = 120",
        ),
        (["--gpu", "v100"], "--gpu: unknown hardware 'v100'"),
        (["--infer-gpu", "tpu"], "--infer-gpu: unknown hardware 'tpu'"),
        (["--parallel.tp", "7"], "parallel.tp: 7 does not divide model.n_heads (120)"),
        (["--infer-tp", "7"], "--infer-tp: 7 does not divide model.n_heads (120)"),
        (["--mfu", "0"], "--mfu: must be in (0, 1], got 0.0"),
        (["--zero", "5"], "--zero: stage must be 0, 1, 2 or 3, got 5"),
        (
            ["--precision", "fp8", "--gpu", "a100-40g", "--gpus", "120"],
            "--precision fp8: a100-40g has no fp8 tensor cores",
        ),
        (["--hbm-gb", "-1"], "--hbm-gb: must be positive, got -1.0"),
        (["--hbm-gb", "inf"], "--hbm-gb: must be a finite number, got inf"),
        (["--tokens", "nan"], "--tokens: must be a finite number, got nan"),
        (["--context", "40000"], "--context: 40000 exceeds model.max_seq_len (8192)"),
        (["--tokens", "0"], "--tokens: must be positive, got 0.0"),
        (["--context", "-5"], "--context: must be positive, got -5"),
        (["--infer-batch", "0"], "--infer-batch: must be positive, got 0"),
        (
            ["--infer-precision", "fp8", "--infer-gpu", "a100-80g"],
            "--infer-precision fp8: a100-80g has no fp8 tensor cores",
        ),
    ],
)
def test_impossible_inputs_get_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(["plan", "--config", GPT4, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moegpt: error: {message}"), err
    assert "\n" not in err


def test_plan_without_vision_has_none_and_bad_vision_options_are_one_line(capsys) -> None:
    assert main(["plan", "--config", "configs/tiny.toml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vision"] is None
    assert main(["plan", "--config", GPT4, "--tokens-per-image", "0"]) == 2
    assert "--tokens-per-image: must be positive, got 0.0" in capsys.readouterr().err


def test_the_vision_stage_runs_at_the_mfu_days_imply(capsys) -> None:
    """Even an impossible one (above 1), which the text plan reports rather than refuses."""
    assert main(["plan", "--config", GPT4, "--json", "--days", "1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    stage, mfu = plan["vision"]["stage"], plan["training"]["mfu"]
    peak = plan["inputs"]["train_gpu"]["peak_bf16_flops"]
    gpus = plan["training"]["gpus"]
    assert gpus == 24_960  # the preset's cluster: the seed's ~25,000 GPUs
    assert stage["days"] == pytest.approx(stage["flops"] / (gpus * peak * mfu) / 86400)


def test_tokens_lengthen_the_schedule_and_the_peak_lr_is_shown(capsys) -> None:
    small = str(ROOT / "configs" / "small-moe.toml")
    assert main(["plan", "--config", small, "--json", "--tokens", "8e12"]) == 0
    plan = json.loads(capsys.readouterr().out)
    trained = sum(p["tokens"] for p in plan["batch_schedule"])
    seq, batch = plan["inputs"]["seq_len"], plan["batch_schedule"][-1]["batch_size"]
    assert 8e12 <= trained < 8e12 + batch * seq  # the fewest steps that train them
    config = load_config(small)
    assert plan["learning_rate"] == {
        "peak": config.train.lr,
        "warmup_steps": config.train.warmup_steps,
    }
    assert main(["plan", "--config", small]) == 0
    assert f"peak learning rate {config.train.lr:.2e}" in " ".join(capsys.readouterr().out.split())


def test_a_serving_layout_that_cannot_hold_the_weights_is_refused_naming_one_that_can(
    capsys,
) -> None:
    """Mixtral's shape on one H100 at TP1: it printed a negative free memory, batch 0, and
    still a decode roofline and a price."""
    small = str(ROOT / "configs" / "small-moe.toml")
    mixtral = ["--model.n_layers", "32", "--model.d_model", "4096", "--model.n_heads", "32"]
    mixtral += ["--model.n_experts", "8", "--model.expert_hidden", "14336"]
    assert main(["plan", "--config", small, *mixtral]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "serve layout TP1 x PP1 on h100-sxm: the weights take" in err
    assert err.rstrip().endswith("--infer-tp 2 --infer-pp 1 would fit")
    assert main(["plan", "--config", small, *mixtral, "--infer-tp", "2"]) == 0


def test_a_batch_beyond_what_the_cache_holds_is_refused_with_the_largest_that_fits(
    capsys,
) -> None:
    """It used to be priced as if it fitted: 100,000 sequences on one H100 at 2k tokens."""
    small = str(ROOT / "configs" / "small-moe.toml")
    assert main(["plan", "--config", small, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    fits, context = plan["kv_cache"]["max_batch"], plan["inputs"]["context"]
    assert main(["plan", "--config", small, "--infer-batch", str(fits)]) == 0
    capsys.readouterr()
    assert main(["plan", "--config", small, "--infer-batch", str(fits + 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moegpt: error: --infer-batch: {fits + 1:,}")
    assert f"at most {fits:,} fit" in err
    shorter = int(err.rstrip().rsplit("--context ", 1)[1].replace(",", ""))
    assert shorter < context  # and that context does hold them
    argv = ["--infer-batch", str(fits + 1), "--context", str(shorter)]
    assert main(["plan", "--config", small, *argv]) == 0
