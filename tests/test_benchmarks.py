"""The benchmark scripts are plain files run on machines CI never sees (a GPU's, for one
call): each must at least parse under the Python this project supports."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_each_benchmark_script_parses(script: Path) -> None:
    compile(script.read_text(), str(script), "exec")


def _multi_gpu():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multi_gpu.py"
    spec = importlib.util.spec_from_file_location("multi_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_layout_names_map_to_parallel_settings() -> None:
    layouts = _multi_gpu().scaling_layouts(["fsdp", "fsdp-ep", "fsdp-ep2", "fsdp-ep8"], 4, 16, 0)
    assert layouts == {
        "fsdp": ["--parallel.dp_shard", "4"],
        "fsdp-ep": ["--parallel.dp_shard", "4", "--parallel.ep", "4"],
        "fsdp-ep2": ["--parallel.dp_shard", "4", "--parallel.ep", "2"],
    }  # EP over 8 ranks does not fit 4 GPUs: skipped at that size
    capped = _multi_gpu().scaling_layouts(["fsdp-ep"], 8, 16, 2)
    assert capped == {"fsdp-ep": ["--parallel.dp_shard", "8", "--parallel.ep", "2"]}
