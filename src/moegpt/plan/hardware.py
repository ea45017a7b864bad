"""GPU presets for planning: peak throughput, memory, bandwidth and a default hourly price.

Peaks are the datasheet's dense (no sparsity) figures, the usual MFU denominator. Prices are
the seed's ($1 per A100-hour, $2 per H100-hour) where it gives one; others are ours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moegpt.errors import UserError


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_bf16_flops: float  # dense bf16 FLOP/s
    peak_fp8_flops: float  # dense fp8 FLOP/s; 0 where the chip has no fp8 tensor cores
    hbm_bytes: float  # usable device memory
    hbm_bandwidth: float  # bytes/s
    nvlink_bandwidth: float  # bytes/s per GPU, one direction
    price_per_hour: float  # dollars per GPU-hour

    def peak_flops(self, precision: str, option: str = "--precision") -> float:
        if precision == "fp8":
            if not self.peak_fp8_flops:
                raise UserError(f"{option} fp8: {self.name} has no fp8 tensor cores")
            return self.peak_fp8_flops
        return self.peak_bf16_flops


GIB = 1 << 30  # memory sizes are binary: a "40GB" A100 holds 40 GiB
PRESETS: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("a100-40g", 312e12, 0.0, 40 * GIB, 1.555e12, 300e9, 1.0),
        Hardware("a100-80g", 312e12, 0.0, 80 * GIB, 2.039e12, 300e9, 1.0),
        Hardware("h100-sxm", 989e12, 1979e12, 80 * GIB, 3.35e12, 450e9, 2.0),
        Hardware("h200", 989e12, 1979e12, 141 * GIB, 4.8e12, 450e9, 2.5),
    )
}


def get_hardware(name: str, option: str = "--gpu", **overrides: float | None) -> Hardware:
    """A preset by name with any non-None figure replaced (e.g. ``price_per_hour=1.5``)."""
    if name not in PRESETS:
        raise UserError(f"{option}: unknown hardware {name!r} (known: {', '.join(PRESETS)})")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[name], **changes)
