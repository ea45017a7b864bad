"""``GET /metrics`` through prometheus_client: the page parses as Prometheus text, keeps its
metric names, and its values match the engine's state; each app has a registry of its own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moegpt.config import ServeConfig
from moegpt.serve.async_engine import AsyncEngine
from moegpt.serve.engine import Engine
from moegpt.serve.metrics import RejectedCollector
from moegpt.serve.server import build_app
from moegpt.serve.stats import LATENCY_BUCKETS, Histogram

pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # after the skip: it needs httpx

MODEL = "tiny-test"

# Every family on the page, by its type: the names scrapers and dashboards depend on.
FAMILIES = {
    "moegpt_requests_running": "gauge",
    "moegpt_requests_waiting": "gauge",
    "moegpt_kv_blocks_used": "gauge",
    "moegpt_kv_blocks_total": "gauge",
    "moegpt_generation_tokens_per_second": "gauge",
    "moegpt_prompt_tokens": "counter",
    "moegpt_generation_tokens": "counter",
    "moegpt_steps": "counter",
    "moegpt_preemptions": "counter",
    "moegpt_latency_bound_misses": "counter",
    "moegpt_spec_proposed_tokens": "counter",
    "moegpt_spec_accepted_tokens": "counter",
    "moegpt_spec_acceptance_rate": "gauge",
    "moegpt_spec_mean_accepted": "gauge",
    "moegpt_spec_propose_share": "gauge",
    "moegpt_time_to_first_token_seconds": "histogram",
    "moegpt_time_per_output_token_seconds": "histogram",
    "moegpt_requests_rejected": "counter",
}


def samples(page: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from a Prometheus text page."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }


@pytest.fixture()
def engine(text_model: Path) -> Engine:
    return Engine.from_folder(text_model, ServeConfig(num_kv_blocks=64, calibrate=False), "cpu")


def test_metrics_page_matches_engine_state(engine: Engine) -> None:
    async_engine = AsyncEngine(engine)
    try:
        client = TestClient(build_app(async_engine, MODEL))  # no lifespan: shut down below
        usages = []
        for i, prompt in enumerate(["def f(x):", "import torch", "return self"]):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 3 + i}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
        r = client.get("/metrics")
    finally:
        async_engine.shutdown()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    assert families == FAMILIES
    page = samples(r.text)

    def value(name: str, **labels: str) -> float:
        return page[name, tuple(sorted(labels.items()))]

    stats = engine.stats
    used, total = engine.kv_usage()
    assert value("moegpt_kv_blocks_used") == used == 0
    assert value("moegpt_kv_blocks_total") == total == 64
    assert value("moegpt_requests_running") == value("moegpt_requests_waiting") == 0
    generated = sum(u["completion_tokens"] for u in usages)
    assert value("moegpt_generation_tokens_total") == stats.generated_tokens == generated
    assert value("moegpt_prompt_tokens_total") == stats.prompt_tokens > 0
    assert value("moegpt_steps_total") == stats.steps > 0
    assert value("moegpt_preemptions_total") == 0
    assert value("moegpt_requests_rejected_total", reason="queue_full") == 0
    # one first token per request; a time per output token for those with more than one
    ttft, tpot = "moegpt_time_to_first_token_seconds", "moegpt_time_per_output_token_seconds"
    assert value(f"{ttft}_count") == value(f"{ttft}_bucket", le="+Inf") == len(usages)
    assert value(f"{ttft}_sum") == pytest.approx(sum(stats.ttft_seconds))
    assert value(f"{tpot}_count") == sum(u["completion_tokens"] > 1 for u in usages)
    buckets = [value(f"{ttft}_bucket", le=str(b)) for b in LATENCY_BUCKETS]
    assert buckets == sorted(buckets)  # cumulative
    assert buckets == [sum(t <= b for t in stats.ttft_seconds) for b in LATENCY_BUCKETS]


def test_each_app_has_its_own_registry(engine: Engine) -> None:
    """Two apps in one process: no duplicate-name clash, nothing in the global registry."""
    engines = [AsyncEngine(engine), AsyncEngine(engine)]
    try:
        apps = [TestClient(build_app(e, MODEL)) for e in engines]
        apps[0].app.state.server.rejected["queue_full"] += 2
        pages = [samples(c.get("/metrics").text) for c in apps]
    finally:
        for e in engines:
            e.shutdown()
    rejected = ("moegpt_requests_rejected_total", (("reason", "queue_full"),))
    assert [p[rejected] for p in pages] == [2, 0]
    assert b"moegpt_" not in generate_latest(REGISTRY)


def test_rejected_counts_by_reason() -> None:
    registry = CollectorRegistry()
    counts = {"too_large": 1}
    registry.register(RejectedCollector(counts))
    counts["too_large"] += 1
    page = samples(generate_latest(registry).decode())
    assert page == {
        ("moegpt_requests_rejected_total", (("reason", "queue_full"),)): 0,
        ("moegpt_requests_rejected_total", (("reason", "too_large"),)): 2,
    }


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    hist = Histogram(bounds=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        hist.observe(v)
    buckets, total = hist.snapshot()
    assert buckets == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert total == pytest.approx(4.65)


def test_histogram_snapshot_is_consistent_while_observed() -> None:
    """The engine's thread observes while a scrape reads: each snapshot's sum and count agree."""
    hist, stop = Histogram(), threading.Event()

    def observe() -> None:
        while not stop.is_set():
            hist.observe(1.0)

    thread = threading.Thread(target=observe)
    thread.start()
    try:
        for _ in range(2000):
            buckets, total = hist.snapshot()
            assert total == buckets[-1][1]
    finally:
        stop.set()
        thread.join()
