"""The Prometheus registry: SPEC §7's names, gauges read at scrape time, and a scrape that
survives a gauge that cannot be read."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from relayd.metrics import Metrics


def families(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = metrics.render().decode()
    return {
        f.name: [(s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
    }


def test_the_names_operators_rely_on() -> None:
    """Every metric of SPEC §7 is there, with its labels, before anything happened."""
    metrics = Metrics()
    metrics.upstream_requests.labels("main", "200").inc()
    metrics.rate_limited.labels("main")
    metrics.deliveries.labels("app", "success").inc(2)
    metrics.delivery_latency.observe(0.3)
    metrics.intake.labels("api", "accepted").inc()
    found = families(metrics)
    for name in (
        "relayd_upstream_requests",
        "relayd_upstream_rate_limited",
        "relayd_budget_used",
        "relayd_jobs",
        "relayd_deliveries",
        "relayd_delivery_latency_seconds",
        "relayd_intake",
    ):
        assert name in found, name
    assert ({"provider": "main", "code": "200"}, 1.0) in found["relayd_upstream_requests"]
    assert ({"endpoint": "app", "outcome": "success"}, 2.0) in found["relayd_deliveries"]
    assert ({"provider": "main"}, 0.0) in found["relayd_upstream_rate_limited"]


def test_gauges_are_read_at_each_scrape() -> None:
    """A gauge is a reading of now, not a value kept: two scrapes see two readings."""
    metrics = Metrics()
    jobs = {"polling": 3.0}
    metrics.gauges.jobs = lambda: jobs
    assert families(metrics)["relayd_jobs"] == [({"state": "polling"}, 3.0)]
    jobs["polling"] = 1.0
    assert families(metrics)["relayd_jobs"] == [({"state": "polling"}, 1.0)]


def test_a_gauge_that_cannot_be_read_leaves_the_rest() -> None:
    """A broken database empties its gauges for that scrape; the counters still answer."""
    metrics = Metrics()
    metrics.deliveries.labels("app", "dead").inc()

    def broken() -> dict[str, float]:
        raise OSError("disk I/O error")

    metrics.gauges.jobs = broken
    metrics.gauges.budget_used = lambda: {"main": 7.0}
    found = families(metrics)
    assert found["relayd_jobs"] == []
    assert found["relayd_budget_used"] == [({"provider": "main"}, 7.0)]
    assert ({"endpoint": "app", "outcome": "dead"}, 1.0) in found["relayd_deliveries"]
