"""The benchmark scripts are plain files run on machines CI never sees (a GPU's, for one
call): each must at least parse under the Python this project supports."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_each_benchmark_script_parses(script: Path) -> None:
    compile(script.read_text(), str(script), "exec")
