"""Tensor-parallel loading reads only each rank's slices: two gloo ranks under torchrun load
model folders with ``load_sharded`` while ``safe_open`` is spied on. Every local shard equals
DTensor's own split of the whole tensor under the training plan, no sharded tensor is read
whole (``get_tensor``), each rank reads about half of the sharded tensors' elements, and a
tensor refused on one rank's slice is refused by both ranks, naming it. One torchrun launch
covers MQA with MoE and an uneven vocabulary, GQA with split K/V and a tied embedding in
bfloat16, and a NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from moegpt.model import Transformer
from moegpt.weights import WEIGHTS_FILE, save_model
from tests.conftest import restamp_weights, small_config

TP = 2
MODELS = {
    # MQA (replicated K/V), dense + MoE layers (experts split by hidden unit), untied
    # vocabulary-parallel embedding and head over an odd vocabulary (uneven blocks).
    "mqa-moe": dict(n_layers=2, first_k_dense=1, vocab_size=97, tie_embeddings=False),
    # GQA with K/V heads split, gelu, dense only, a tied (replicated) embedding, bfloat16.
    "gqa-tied-bf16": dict(n_kv_heads=2, n_experts=0, activation="gelu", tie_embeddings=True),
}


def _folders(root: Path) -> dict[str, str]:
    folders = {}
    for name, overrides in MODELS.items():
        torch.manual_seed(0)
        model = Transformer(small_config(**overrides))
        if name.endswith("bf16"):
            model = model.to(torch.bfloat16)
        folders[name] = str(save_model(model, root / name))
    # A NaN in the last row of the head: only rank 1's block of it holds the NaN.
    path = Path(folders["mqa-moe"])
    state = load_file(path / WEIGHTS_FILE)
    state["output.weight"][-1, 0] = float("nan")
    bad = root / "nan"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    save_file(state, bad / WEIGHTS_FILE, metadata={"format": "moegpt"})
    restamp_weights(bad)
    folders["nan"] = str(bad)
    return folders


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("sharded-load")
    (root / "jobs.json").write_text(json.dumps({"folders": _folders(root), "out": str(root)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={TP}", "-m", "tests.serve.test_sharded_load"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(
        [*command, str(root / "jobs.json")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(TP)]


@pytest.mark.parametrize("name", list(MODELS))
def test_each_rank_reads_only_its_slices(reports: list[dict[str, Any]], name: str) -> None:
    runs = [report[name] for report in reports]
    for run in runs:
        assert "error" not in run, run.get("error")
        assert run["mismatched"] == []
        assert run["sharded"], "nothing was sharded"
        # No sharded tensor was read whole; replicated ones were, exactly once.
        assert not set(run["read_whole"]) & set(run["sharded"])
        assert sorted(run["read_whole"]) == sorted(run["replicated"])
        assert set(run["sliced"]) == set(run["sharded"])
        sharded_total = sum(run["sharded"].values())
        assert 0.45 < sum(run["sliced"].values()) / sharded_total < 0.55
    for tensor in runs[0]["sharded"]:  # the ranks' blocks make up each tensor exactly
        assert sum(run["sliced"][tensor] for run in runs) == runs[0]["sharded"][tensor]
    # Sums in another order: fp32 rounding, or bf16's.
    tolerance = 2e-2 if name.endswith("bf16") else 1e-5
    assert all(run["logits_error"] < tolerance for run in runs), [r["logits_error"] for r in runs]


def test_a_refused_slice_stops_every_rank(reports: list[dict[str, Any]]) -> None:
    errors = {report["nan"].get("error") for report in reports}
    assert len(errors) == 1
    (error,) = errors
    assert error is not None and "tensor output.weight has NaN or infinite values" in error


# --- the torchrun side ------------------------------------------------------------------------


class _SpySlice:
    def __init__(self, inner: Any, count: Any) -> None:
        self.inner, self.count = inner, count

    def __getitem__(self, index: Any) -> torch.Tensor:
        block = self.inner[index]
        self.count(block.numel())
        return block


class _SpyFile:
    """``safe_open`` that records what was read: whole tensors by name, sliced elements."""

    log: ClassVar[dict[str, dict[str, int]]] = {"whole": {}, "sliced": {}}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from safetensors import safe_open

        self.inner = safe_open(*args, **kwargs)

    def __enter__(self) -> _SpyFile:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self.inner.__exit__(*exc)

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self.inner.get_tensor(name)
        self.log["whole"][name] = self.log["whole"].get(name, 0) + tensor.numel()
        return tensor

    def get_slice(self, name: str) -> _SpySlice:
        def count(n: int) -> None:
            self.log["sliced"][name] = self.log["sliced"].get(name, 0) + n

        return _SpySlice(self.inner.get_slice(name), count)


def _training_layout(folder: str) -> dict[str, DTensor]:
    """The training code's DTensor split of the folder's model (on the meta device): the
    reference for which block of each tensor a serving rank must hold."""
    from moegpt.config import ParallelConfig
    from moegpt.model.moe import GroupedExperts
    from moegpt.parallel.experts import shard_experts
    from moegpt.parallel.mesh import ParallelDims
    from moegpt.parallel.tensor import apply_tensor_parallel
    from moegpt.weights import check_folder

    dims = ParallelDims.build(ParallelConfig(tp=TP), torch.device("cpu"))
    with torch.device("meta"):
        model = Transformer(check_folder(folder).config)
    apply_tensor_parallel(model, dims["tp"])
    for experts in [m for m in model.modules() if isinstance(m, GroupedExperts)]:
        shard_experts(experts, dims)
    return {
        name: t
        for name, t in model.state_dict().items()
        if isinstance(t, DTensor) and any(p != Replicate() for p in t.placements)
    }


def _check_one(folder: str) -> dict[str, Any]:
    import moegpt.weights
    from moegpt.errors import UserError
    from moegpt.serve.tensor_parallel import load_sharded

    _SpyFile.log = {"whole": {}, "sliced": {}}
    real = moegpt.weights.safe_open
    moegpt.weights.safe_open = _SpyFile
    try:
        model, _ = load_sharded(folder, TP, torch.device("cpu"), timeout_s=60)
    except UserError as e:
        return {"error": str(e)}
    finally:
        moegpt.weights.safe_open = real
    full = load_file(Path(folder) / WEIGHTS_FILE)
    training = _training_layout(folder)
    sharded, replicated, mismatched = {}, [], []
    for name, have in model.state_dict().items():
        if name in training:
            sharded[name] = training[name].numel()
            reference = training[name]
            want = distribute_tensor(
                full[name], reference.device_mesh, reference.placements, src_data_rank=None
            ).to_local()
        else:
            replicated.append(name)
            want = full[name]
        if have.dtype != want.dtype or not torch.equal(have, want):
            mismatched.append(name)
    # The split model's forward (its all-reduces and the head's gather) against one process.
    ids = torch.arange(11).remainder(model.config.vocab_size)[None] * 7 % model.config.vocab_size
    with torch.inference_mode():
        got = model(ids).logits.float()
        want = moegpt.weights.load(folder, device="cpu")(ids).logits.float()
    return {
        "logits_error": (got - want).abs().max().item() / want.abs().max().item(),
        "sharded": sharded,
        "replicated": replicated,
        "mismatched": mismatched,
        "read_whole": list(_SpyFile.log["whole"]),
        "sliced": _SpyFile.log["sliced"],
        "elements_read": sum(_SpyFile.log["whole"].values()) + sum(_SpyFile.log["sliced"].values()),
        "elements_total": sum(t.numel() for t in full.values()),
    }


def main(jobs_file: str) -> None:
    import torch.distributed as dist

    jobs = json.loads(Path(jobs_file).read_text())
    report = {name: _check_one(folder) for name, folder in jobs["folders"].items()}
    rank = dist.get_rank()
    (Path(jobs["out"]) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
