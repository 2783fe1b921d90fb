"""Prometheus metrics (SPEC §7) in a registry of the daemon's own; gauges read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Gauges(Collector):
    def __init__(self) -> None:
        self.jobs: Callable[[], Mapping[str, int]] = dict
        self.budget_used: Callable[[], Mapping[str, int]] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("relayd_jobs", "Jobs by state.", labels=["state"])
        for state, n in sorted(self.jobs().items()):
            jobs.add_metric([state], n)
        yield jobs
        used = GaugeMetricFamily(
            "relayd_budget_used",
            "Requests sent to the provider in the current wall-clock window.",
            labels=["provider"],
        )
        for provider, n in sorted(self.budget_used().items()):
            used.add_metric([provider], n)
        yield used


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.upstream_requests = Counter(
            "relayd_upstream_requests",
            "Requests sent to providers, by answer code ('error': no answer).",
            ["provider", "code"],
            registry=r,
        )
        self.rate_limited = Counter(
            "relayd_upstream_rate_limited", "429 answers from providers.", ["provider"], registry=r
        )
        self.deliveries = Counter(
            "relayd_deliveries",
            "Delivery attempts by outcome (success, retry, dead).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.delivery_latency = Histogram(
            "relayd_delivery_latency_seconds",
            "From the poll that saw the job finished to the endpoint's first 2xx.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        self.intake = Counter(
            "relayd_intake", "Submissions by source and outcome.", ["source", "outcome"], registry=r
        )
        self.gauges = _Gauges()
        r.register(self.gauges)

    def render(self) -> bytes:
        return generate_latest(self.registry)
