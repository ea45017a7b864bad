"""The engine's numbers for Prometheus (``GET /metrics``), exported through
``prometheus_client``: collectors that read the engine's stats when scraped, registered in a
registry of each app's own (never the process-wide default one)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from moegpt.serve.engine import Engine
from moegpt.serve.stats import Histogram


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"moegpt_{name}", help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    # prometheus_client appends ``_total`` to a counter's samples
    return CounterMetricFamily(f"moegpt_{name}", help_text, value=value)


def _by_reason(name: str, help_text: str, counts: Mapping[str, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"moegpt_{name}", help_text, labels=["reason"])
    for reason, value in sorted(counts.items()):
        family.add_metric([reason], value)
    return family


def _histogram(name: str, help_text: str, hist: Histogram) -> HistogramMetricFamily:
    buckets, total = hist.snapshot()
    return HistogramMetricFamily(f"moegpt_{name}", help_text, buckets=buckets, sum_value=total)


class EngineCollector(Collector):
    """The engine's state and counters, read at each scrape (between or during steps: each
    value is consistent, the page as a whole need not be)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats, scheduler = self.engine.stats, self.engine.scheduler
        used, total = self.engine.kv_usage()
        spec = stats.spec
        yield _gauge("requests_running", "sequences in the running batch", len(scheduler.running))
        yield _gauge(
            "requests_waiting", "sequences waiting to be scheduled", len(scheduler.waiting)
        )
        yield _gauge("kv_blocks_used", "paged KV-cache blocks in use", used)
        yield _gauge("kv_blocks_total", "paged KV-cache blocks allocated", total)
        yield _gauge(
            "generation_tokens_per_second",
            "tokens generated per second, last 10 s",
            stats.throughput.rate(),
        )
        yield _counter("prompt_tokens", "prompt tokens prefilled", stats.prompt_tokens)
        yield _counter("generation_tokens", "tokens generated", stats.generated_tokens)
        yield _counter("steps", "engine steps run", stats.steps)
        yield _counter("preemptions", "sequences preempted for KV-cache room", stats.preemptions)
        yield _by_reason(
            "latency_bound_misses",
            "steps over the time-per-output-token target, by why",
            dict(stats.bound_misses),
        )
        yield _counter("spec_proposed_tokens", "speculative tokens proposed", spec.proposed)
        yield _counter("spec_accepted_tokens", "speculative tokens accepted", spec.accepted)
        yield _gauge(
            "spec_acceptance_rate", "accepted / proposed speculative tokens", spec.acceptance_rate
        )
        yield _gauge("spec_mean_accepted", "accepted tokens per verification", spec.mean_accepted)
        yield _gauge(
            "spec_propose_share", "share of step time spent proposing", stats.propose_share
        )
        yield _histogram("time_to_first_token_seconds", "time to first token", stats.ttft_hist)
        yield _histogram(
            "time_per_output_token_seconds",
            "mean time per output token of finished requests",
            stats.tpot_hist,
        )


class RejectedCollector(Collector):
    """``moegpt_requests_rejected_total{reason}``: requests the server refused before they
    reached the engine, read from its counts (every reason in ``reasons`` shown, 0 or not)."""

    def __init__(self, counts: Mapping[str, int], reasons: tuple[str, ...] = ("queue_full",)):
        self.counts = counts
        self.reasons = reasons

    def collect(self) -> Iterator[Metric]:
        counts = dict.fromkeys(self.reasons, 0) | dict(self.counts)
        yield _by_reason(
            "requests_rejected", "requests refused before reaching the engine, by why", counts
        )
