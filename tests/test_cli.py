"""The command line: help for every verb, model summary on every shipped recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moegpt.cli import main
from moegpt.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def every_verb() -> list[list[str]]:
    """The argv of every verb and sub-verb the parser has, and of none."""
    import argparse

    from moegpt.cli import build_parser

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        found = [prefix]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += walk(sub, [*prefix, name])
        return found

    return walk(build_parser(), [])


@pytest.mark.parametrize("argv", every_verb(), ids=lambda argv: " ".join(argv) or "moegpt")
def test_every_verb_has_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    assert "usage: moegpt" in capsys.readouterr().out


def test_python_dash_m_runs_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moegpt", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("moegpt ")


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [Path(sys.executable).with_name("moegpt"), "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("moegpt ")


@pytest.mark.parametrize("name", ["tiny", "small-moe", "gpt4-1.8t"])
def test_model_summary_json_matches_the_kv_cache_closed_form(name: str, capsys) -> None:
    path = ROOT / "configs" / f"{name}.toml"
    assert main(["model", "summary", "--config", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    m = load_config(path).model
    assert summary["kv_bytes_per_token"] == 2 * m.n_layers * m.n_kv_heads * m.head_dim * 2
    assert summary["kv_bytes_per_token_mha"] == 2 * m.n_layers * m.n_heads * m.head_dim * 2
    assert summary["layers"][-1]["last"] == m.n_layers - 1
    per_layer = sum(
        (r["last"] - r["first"] + 1) * (r["attention"] + r["ffn_total"]) for r in summary["layers"]
    )
    params = summary["params"]
    assert params["total"] == per_layer + params["embedding"] + m.d_model  # + final norm


def test_model_summary_table_for_the_seed_model(capsys) -> None:
    assert main(["model", "summary", "--config", str(ROOT / "configs/gpt4-1.8t.toml")]) == 0
    out = capsys.readouterr().out
    assert "0-119" in out and "MoE 16x top-2" in out
    assert "1.87T total" in out and "287B active" in out
    assert "61,440 bytes" in out  # 2 (K,V) x 120 layers x 1 head x 128 x 2 bytes


def test_model_summary_counts_the_seeds_vision_as_the_planner_does(capsys) -> None:
    """The summary counts vision on modules built on the meta device; the planner in closed
    form: at the seed's scale they agree."""
    from moegpt.plan.vision import vision_params

    path = ROOT / "configs/gpt4-1.8t.toml"
    assert main(["model", "summary", "--config", str(path), "--json"]) == 0
    vision = json.loads(capsys.readouterr().out)["vision"]
    config = load_config(path)
    counted = vision_params(config.model, config.vision)
    assert vision["cross_attention_blocks"] == 15  # before layers 0, 8, ..., 112
    assert (vision["encoder"], vision["resampler"]) == (counted.encoder, counted.resampler)
    assert vision["cross_attention"] == counted.cross_attention


def test_config_show_prints_loadable_toml(tmp_path: Path, capsys) -> None:
    assert (
        main(
            ["config", "show", "--config", str(ROOT / "configs/tiny.toml"), "--model.n_layers", "2"]
        )
        == 0
    )
    path = tmp_path / "shown.toml"
    path.write_text(capsys.readouterr().out)
    assert load_config(path) == load_config(ROOT / "configs/tiny.toml", ["--model.n_layers", "2"])


def test_unknown_arguments_to_verbs_without_config_are_rejected(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["convert", "a", "b", "--model.n_layers", "2"])
    assert info.value.code == 2


def test_sigusr1_prints_every_threads_stack_and_the_run_goes_on() -> None:
    """`kill -USR1 PID` on a stuck run says where each thread waits (how a tensor-parallel
    exit hang was found), without stopping it."""
    script = (
        "import os, signal\n"
        "from moegpt.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "print('still running')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "still running" in done.stdout
    assert "most recent call first" in done.stderr
