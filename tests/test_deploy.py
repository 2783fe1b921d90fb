"""deploy/: the Prometheus rules pass `promtool check rules` and their unit tests (`promtool test
rules`, Debian's prometheus package); the Grafana dashboard is well formed and every metric it
and the rules query is one relayd exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from relayd.metrics import Metrics

DEPLOY = Path(__file__).parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "relayd.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "relayd.json"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is missing: apt-get install prometheus"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must check the alert rules", pytrace=False)
        pytest.skip(message)
    return found


def test_the_rules_pass_promtool_check() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout


def test_the_main_rules_fire_as_their_unit_tests_say() -> None:
    tests = RULES.with_name("relayd.rules.test.yml")
    done = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def exported() -> set[str]:
    """Every metric name relayd's /metrics can carry (counters with their _total, histograms
    with their _bucket)."""
    text = Metrics().render().decode()
    names = {"up"}  # Prometheus's own, per scrape target
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, re.M):
        names |= {
            name,
            *(name.removesuffix("_total") + suffix for suffix in suffixes.get(kind, [""])),
        }
    return names


def queried(expr: str) -> set[str]:
    return set(re.findall(r"\b(relayd_[a-z_]+|up)\b", expr))


def test_the_dashboard_is_well_formed_and_queries_only_relayds_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "relayd" and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    names = exported()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert queried(target["expr"]) <= names, (panel["title"], target["expr"])
    rules = RULES.read_text()
    assert queried(rules) <= names
