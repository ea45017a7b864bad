"""What the engine counts as it runs: latency histograms, a throughput meter and the
engine's totals. Written on the engine's thread, read by ``/metrics`` and summaries."""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

from moegpt.serve.speculative import SpecStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Counts per bucket of upper bounds (seconds) and their sum: observed on the engine's
    thread, read from the server's; the lock keeps each snapshot's buckets and sum in step."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative counts per ``le`` label ("+Inf" last), and the sum of the values."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets, running = [], 0
        for bound, count in zip([*self.bounds, float("inf")], counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))
        return buckets, total


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


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    bound_misses: Counter = field(default_factory=Counter)  # reason -> steps over target
    step_seconds: deque = field(default_factory=lambda: deque(maxlen=512))
    ttft_seconds: deque = field(default_factory=lambda: deque(maxlen=4096))
    tpot_seconds: deque = field(default_factory=lambda: deque(maxlen=4096))
    ttft_hist: Histogram = field(default_factory=Histogram)
    tpot_hist: Histogram = field(default_factory=Histogram)
    throughput: ThroughputMeter = field(default_factory=ThroughputMeter)
    spec: SpecStats = field(default_factory=SpecStats)
    propose_seconds: float = 0.0  # time in the proposer (the draft model's forwards)
    busy_seconds: float = 0.0  # time in steps

    @property
    def propose_share(self) -> float:
        """The share of step time spent proposing tokens."""
        return self.propose_seconds / self.busy_seconds if self.busy_seconds else 0.0
