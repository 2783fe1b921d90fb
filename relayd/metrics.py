"""Prometheus metrics (SPEC §7) in a registry of the daemon's own; gauges read at scrape time.

No label ever carries a job id: labels are providers, endpoints, states and codes, all few.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger("relayd.metrics")

Reading = Callable[[], Mapping[str, float]]


class _Gauges(Collector):
    """Families read from the database and the budgets at scrape time, never cached."""

    def __init__(self) -> None:
        self.jobs: Reading = dict
        self.budget_used: Reading = dict
        self.budget_limit: Reading = dict
        self.oldest_waiting: Reading = dict
        self.deliveries_pending: Reading = dict
        self.deliveries_dead: Reading = dict
        self.shared_reachable: Reading = dict
        self.key_refused: Reading = dict
        self.endpoint_up: Reading = dict
        self.store_bytes: Callable[[], float] = lambda: 0.0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, help_text, label, read in (
            ("relayd_jobs", "Jobs by state.", "state", self.jobs),
            (
                "relayd_budget_used",
                "Requests sent to the provider in the current wall-clock window.",
                "provider",
                self.budget_used,
            ),
            (
                "relayd_budget_limit",
                "Requests the provider allows per window (rate_limit).",
                "provider",
                self.budget_limit,
            ),
            (
                "relayd_oldest_waiting_job_age_seconds",
                "Age of the oldest job still being polled (absent when none is).",
                "provider",
                self.oldest_waiting,
            ),
            (
                "relayd_deliveries_pending",
                "Deliveries waiting for a first or further attempt.",
                "endpoint",
                self.deliveries_pending,
            ),
            (
                "relayd_deliveries_dead",
                "Deliveries that ran out of attempts (see `relayd redeliver`).",
                "endpoint",
                self.deliveries_dead,
            ),
            (
                "relayd_shared_budget_reachable",
                "1 while the shared budget (Redis) answers; 0: nothing is sent on the key.",
                "provider",
                self.shared_reachable,
            ),
            (
                "relayd_key_refused",
                "1 while the provider refuses the API key (401/403): its jobs wait, probed.",
                "provider",
                self.key_refused,
            ),
            (
                "relayd_endpoint_up",
                "0 while the endpoint is down (probed one delivery at a time), else 1.",
                "endpoint",
                self.endpoint_up,
            ),
        ):
            family = GaugeMetricFamily(name, help_text, labels=[label])
            try:
                values = read()
            except Exception as exc:  # a broken database must not take the counters down
                log.warning("metrics: cannot read %s: %s", name, exc)
                values = {}
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            yield family
        store = GaugeMetricFamily(
            "relayd_store_bytes", "Bytes the database takes on disk, its WAL included."
        )
        try:
            store.add_metric([], self.store_bytes())
        except Exception as exc:
            log.warning("metrics: cannot read relayd_store_bytes: %s", exc)
        yield store


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
            "relayd_intake",
            "Submissions (spool files, API requests) by source and outcome.",
            ["source", "outcome"],
            registry=r,
        )
        self.pruned = Counter(
            "relayd_pruned",
            "What retention deleted: jobs, and their polls, deliveries and attempts.",
            ["what"],
            registry=r,
        )
        self.gauges = _Gauges()
        r.register(self.gauges)

    def render(self) -> bytes:
        return generate_latest(self.registry)
