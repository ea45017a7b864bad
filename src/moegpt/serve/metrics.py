"""The engine's numbers in Prometheus' text exposition format (``GET /metrics``)."""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moegpt.serve.engine import Engine

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    """Cumulative counts per upper bound (seconds), as Prometheus histograms are."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return [*out, f"{name}_sum {self.total}", f"{name}_count {running}"]


@dataclass
class Metric:
    name: str
    kind: str  # gauge | counter
    help: str
    value: float | dict[str, float]  # a dict: one series per value of the label ``reason``


class ThroughputMeter:
    """Generated tokens per second over a sliding window of recent steps."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()

    def add(self, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._events.append((now, tokens))
        self._trim(now)

    def rate(self, now: float | None = None) -> float:
        """Safe to call from another thread than ``add``'s: it reads a snapshot."""
        now = time.monotonic() if now is None else now
        recent = [t for at, t in list(self._events) if at >= now - self.window_s]
        return sum(recent) / self.window_s

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()


def render(metrics: list[Metric], histograms: dict[str, tuple[str, Histogram]]) -> str:
    lines = []
    for s in metrics:
        lines += [f"# HELP {s.name} {s.help}", f"# TYPE {s.name} {s.kind}"]
        if isinstance(s.value, dict):
            lines += [f'{s.name}{{reason="{k}"}} {v}' for k, v in sorted(s.value.items())]
        else:
            lines.append(f"{s.name} {s.value}")
    for name, (help_text, hist) in histograms.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name)]
    return "\n".join(lines) + "\n"


def engine_metrics(engine: Engine) -> str:
    """The engine's state and counters as a /metrics page (read under the engine's lock)."""
    stats, scheduler = engine.stats, engine.scheduler
    used, total = engine.kv_usage()
    spec = stats.spec

    def gauge(name: str, help_text: str, value: float) -> Metric:
        return Metric(f"moegpt_{name}", "gauge", help_text, value)

    def counter(name: str, help_text: str, value: float | dict[str, float]) -> Metric:
        return Metric(f"moegpt_{name}_total", "counter", help_text, value)

    samples = [
        gauge("requests_running", "sequences in the running batch", len(scheduler.running)),
        gauge("requests_waiting", "sequences waiting to be scheduled", len(scheduler.waiting)),
        gauge("kv_blocks_used", "paged KV-cache blocks in use", used),
        gauge("kv_blocks_total", "paged KV-cache blocks allocated", total),
        gauge(
            "generation_tokens_per_second",
            "tokens generated per second, last 10 s",
            stats.throughput.rate(),
        ),
        counter("prompt_tokens", "prompt tokens prefilled", stats.prompt_tokens),
        counter("generation_tokens", "tokens generated", stats.generated_tokens),
        counter("steps", "engine steps run", stats.steps),
        counter("preemptions", "sequences preempted for KV-cache room", stats.preemptions),
        counter(
            "latency_bound_misses",
            "steps over the time-per-output-token target, by why",
            dict(stats.bound_misses),
        ),
        counter("spec_proposed_tokens", "speculative tokens proposed", spec.proposed),
        counter("spec_accepted_tokens", "speculative tokens accepted", spec.accepted),
        gauge(
            "spec_acceptance_rate", "accepted / proposed speculative tokens", spec.acceptance_rate
        ),
        gauge("spec_mean_accepted", "accepted tokens per verification", spec.mean_accepted),
        gauge("spec_propose_share", "share of step time spent proposing", stats.propose_share),
    ]
    histograms = {
        "moegpt_time_to_first_token_seconds": ("time to first token", stats.ttft_hist),
        "moegpt_time_per_output_token_seconds": (
            "mean time per output token of finished requests",
            stats.tpot_hist,
        ),
    }
    return render(samples, histograms)
