"""What a training step reports: throughput, MFU, memory, router health; and where it goes
(``metrics.jsonl`` always, TensorBoard when it is installed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moegpt.fileio import write_atomically
from moegpt.model.moe import MoEStats

# Dense bf16 peaks, the usual MFU denominator (datasheet figures), by device-name fragment.
# Checked in order, so the more specific names come first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "A10": 125e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPUs: MFU is reported as n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def router_health(stats: list[MoEStats]) -> dict[str, float]:
    """Balance of the last step's routing, averaged over MoE layers: losses, the busiest and
    idlest expert's load as a multiple of the mean, and the dropped share."""
    if not stats:
        return {}
    loads = torch.stack([s.tokens_per_expert.float() for s in stats])
    relative = loads / loads.mean(dim=1, keepdim=True).clamp(min=1e-9)
    return {
        "load_balance_loss": torch.stack([s.load_balance_loss.detach() for s in stats])
        .mean()
        .item(),
        "z_loss": torch.stack([s.z_loss.detach() for s in stats]).mean().item(),
        "expert_load_max": relative.max(dim=1).values.mean().item(),
        "expert_load_min": relative.min(dim=1).values.mean().item(),
        "dropped_fraction": torch.stack([s.dropped_fraction for s in stats]).mean().item(),
    }


class MetricsWriter:
    """Appends one JSON object per event to ``metrics.jsonl`` (flushed, so a kill loses at
    most the line being written) and mirrors numbers to TensorBoard if available.

    A run that starts at ``start_step`` (a resume) trains the steps after it again, so their
    rows from the earlier attempt are dropped first, in both places.
    """

    def __init__(self, run_dir: Path, start_step: int = 0) -> None:
        self.path = run_dir / "metrics.jsonl"
        _truncate(self.path, start_step)
        self._file = self.path.open("a", buffering=1)
        self._tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(
                str(run_dir / "tensorboard"), purge_step=start_step + 1
            )
        except ImportError:  # tensorboard is optional
            pass

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        self._file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _truncate(path: Path, last_step: int) -> None:
    """Keep the rows of steps up to ``last_step`` (and drop a line cut by a kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("step", 0) <= last_step:
            kept.append(line + "\n")
    write_atomically(path, "".join(kept).encode())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All events of a run, the last attempt's value winning for steps that were redone."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for event in events:
        latest[(event["kind"], event["step"])] = event
    return sorted(latest.values(), key=lambda e: (e["step"], e["kind"]))


def data_stream(run_dir: Path) -> list[tuple[int, str]]:
    """(step, hash of the step's token ids) for every step the run finally kept: two runs
    consumed the same data exactly when these lists are equal."""
    return [(e["step"], e["data_sha256"]) for e in read_metrics(run_dir) if e["kind"] == "train"]
