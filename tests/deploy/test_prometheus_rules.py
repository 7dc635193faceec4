"""deploy/prometheus and deploy/grafana without a cluster: the scrape configuration and the rules
pass `promtool check`, every alert rule's unit tests pass (`promtool test rules`), every rule has
a runbook and a test, and the committed dashboards are what deploy/grafana/generate.py writes."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

SOURCE = os.environ.get("KILN_SOURCE") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
PROM = os.path.join(SOURCE, "deploy", "prometheus")

requires_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                       reason="promtool is not installed (Debian: prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROM, capture_output=True, text=True,
                          timeout=120)


@requires_promtool
def test_config_and_rules_are_valid():
    proc = promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@requires_promtool
def test_alert_rule_unit_tests_pass():
    proc = promtool("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_rule_has_a_runbook_and_a_test():
    rules = open(os.path.join(PROM, "alerts.yml")).read()
    tests = open(os.path.join(PROM, "alerts_test.yml")).read()
    names = re.findall(r"^\s+- alert: (\w+)$", rules, re.M)
    assert len(names) >= 9
    assert rules.count("runbook:") == len(names)
    for name in names:
        assert f"alertname: {name}" in tests, f"{name} has no promtool test"
        # ... and at least one case where it fires.
        fires = re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tests)
        assert fires, f"no test expects {name} to fire"


def test_committed_dashboards_are_generated():
    proc = subprocess.run([sys.executable, os.path.join(SOURCE, "deploy", "grafana", "generate.py"),
                           "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
