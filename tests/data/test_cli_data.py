"""`moegpt prepare` and `moegpt data inspect` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from moegpt.cli import main
from moegpt.config import load_config
from moegpt.plan.schedule import build_schedule
from tests.data.conftest import make_config


def test_prepare_then_inspect_json(corpus: Path, capsys) -> None:
    make_config(corpus)  # writes recipe.toml
    recipe = str(corpus / "recipe.toml")
    assert main(["prepare", "--config", recipe]) == 0
    assert "2 sources" in capsys.readouterr().err
    assert main(["data", "inspect", "--config", recipe, "--json", "--samples", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["source"]: r for r in report["sources"]}
    assert rows["a"]["epochs"] == 4 and rows["b"]["epochs"] == 2
    for r in rows.values():  # planned = epochs x (tokens + one end-of-text per document)
        assert r["planned_tokens"] == r["epochs"] * (r["train_tokens"] + r["train_documents"])
    assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-9
    assert report["planned_tokens"] == report["stream_tokens"]
    assert len(report["samples"]) == 3 and report["samples"][0].startswith("[")


def test_inspect_before_prepare_is_one_line(corpus: Path, capsys) -> None:
    make_config(corpus)
    assert main(["data", "inspect", "--config", str(corpus / "recipe.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("run `moegpt prepare --config ...` first") and "\n" not in err


def test_inspect_reports_long_documents_of_a_context_extension(corpus: Path, capsys) -> None:
    make_config(corpus)
    recipe = str(corpus / "recipe.toml")
    assert main(["prepare", "--config", recipe]) == 0
    extension = ["--model.max_seq_len", "64", "--model.rope_scaling.type", "linear"]
    extension += ["--model.rope_scaling.factor", "4", "--model.rope_scaling.original_max_seq_len"]
    extension += ["16", "--data.long_doc_tokens", "16", "--data.long_doc_repeat", "3"]
    capsys.readouterr()
    assert main(["data", "inspect", "--config", recipe, *extension]) == 0
    out = capsys.readouterr().out
    assert "hold a document longer than the original context (16 tokens)" in out
    assert "documents over 16 tokens are read 3x per epoch" in out


def test_inspect_counts_the_sequences_a_ramped_run_reads(corpus: Path, capsys) -> None:
    """With a batch-size ramp a run reads fewer sequences than steps x the full batch."""
    make_config(corpus)
    recipe = str(corpus / "recipe.toml")
    assert main(["prepare", "--config", recipe]) == 0
    ramp = ["--train.steps=40", "--train.global_batch_size=8", "--train.micro_batch_size=2"]
    ramp += ["--train.ramp_start_batch=2", "--train.ramp_increment=2", "--train.ramp_samples=120"]
    assert main(["data", "inspect", "--config", recipe, "--json", *ramp]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    schedule = build_schedule(load_config(recipe, ramp).train)
    assert run["sequences"] == schedule.total_sequences < 40 * 8
