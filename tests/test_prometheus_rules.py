"""Prometheus config and alert rules, checked by promtool (Debian's `prometheus` package;
.ci/run installs it when missing)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))
UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: `apt-get install prometheus` (Debian) provides it"
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_promtool_check_config_passes(promtool: str) -> None:
    out = _run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rule files found" in out.stdout  # the rules were found and checked with it


def test_promtool_check_rules_passes(promtool: str) -> None:
    assert RULES
    out = _run(promtool, "check", "rules", *map(str, RULES))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    assert UNIT_TESTS
    out = _run(promtool, "test", "rules", *map(str, UNIT_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() -> None:
    alerts = {rule["alert"] for path in RULES for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts >= {"ServiceDown", "ConsumerLagGrowing", "BookStale", "CircuitBreakerTripped",
                      "DailyLossNearLimit", "DeadLettersGrowing", "FxSourcesDiverging"}
    assert alerts - fires == set(), "alerts without a firing test"
    assert alerts - quiet == set(), "alerts without a test where they stay quiet"
    assert fires - alerts == set(), "tests of alerts that do not exist"


def test_every_alert_has_a_severity_the_alerter_understands_and_a_summary() -> None:
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
                    assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
