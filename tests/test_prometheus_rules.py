"""Prometheus configuration, recording rules and alerts, checked offline with
promtool (Debian/Ubuntu: apt-get install prometheus), and the rule files'
conventions: names, labels, annotations, a promtool test for every rule."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import promql

PROM_DIR = promql.ROOT / "deploy" / "prometheus"
RULE_FILES = sorted(promql.RULES_DIR.glob("*.yml"))
TEST_FILES = sorted((PROM_DIR / "tests").glob("*.yml"))
SEVERITIES = {"critical", "warning", "info"}
# level:metric:operations, `_total` dropped after rate()
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")


def promtool(*args: str, cwd: Path = PROM_DIR) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail(
            "promtool not found: apt-get install prometheus (Debian/Ubuntu), or put the "
            "promtool of a Prometheus release on PATH"
        )
    result = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, (
        f"promtool {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
    return result.stdout


def test_files_exist():
    assert (PROM_DIR / "prometheus.yml").is_file()
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    assert TEST_FILES, "no promtool test files in deploy/prometheus/tests/"


def test_promtool_check_config():
    out = promtool("check", "config", "prometheus.yml")
    for rule_file in RULE_FILES:  # rule_files: rules/*.yml must pick up both
        assert f"rules/{rule_file.name}" in out


def test_promtool_check_rules():
    promtool("check", "rules", *(str(p.relative_to(PROM_DIR)) for p in RULE_FILES))


def test_promtool_test_rules():
    promtool("test", "rules", *(str(p.relative_to(PROM_DIR)) for p in TEST_FILES))


def test_scrape_jobs():
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"producer", "trainer", "autoscaler", "redis", "prometheus"}
    for name, names, port in (
        ("producer", ["producer"], 9100),
        ("trainer", ["trainer", "trainer-cpu"], 9200),
        # optional: no autoscaler service, no A record, no target (and no TargetDown)
        ("autoscaler", ["autoscaler"], 9300),
    ):
        (sd,) = jobs[name]["dns_sd_configs"]
        # dns_sd_configs defaults to SRV records, which compose DNS does not serve
        assert (sd["names"], sd["type"], sd["port"]) == (names, "A", port)
    assert jobs["redis"]["static_configs"] == [{"targets": ["redis-exporter:9121"]}]


def test_rule_conventions():
    for name, rule in promql.rules():
        if "record" in rule:
            assert RECORD_NAME.match(rule["record"]), f"{name}: {rule['record']}"
            assert "_total" not in rule["record"], f"{name}: {rule['record']} keeps _total"
        else:
            where = f"{name}: {rule['alert']}"
            assert rule.get("labels", {}).get("severity") in SEVERITIES, where
            assert {"summary", "description"} <= set(rule.get("annotations", {})), where


def _tests() -> list[dict]:
    return [t for path in TEST_FILES for t in yaml.safe_load(path.read_text())["tests"]]


def test_every_alert_is_tested_firing_and_quiet():
    """Each alert has a promtool case where it fires and one where it must not."""
    fired, quiet = set(), set()
    for test in _tests():
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {rule["alert"] for _, rule in promql.rules() if "alert" in rule}
    assert alerts >= {
        "TrainerStarving",
        "ProducersStalled",
        "QueueAtBound",
        "DeadLettersAppearing",
        "TargetDown",
    }
    assert alerts - fired == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"


def test_every_recording_rule_is_tested():
    tested = {
        re.split(r"[{\s]", case["expr"].strip())[0]
        for test in _tests()
        for case in test.get("promql_expr_test", [])
    }
    records = {rule["record"] for _, rule in promql.rules() if "record" in rule}
    assert records - tested == set()


def test_every_query_parses(tmp_path):
    """Dashboard targets, with Grafana's variables substituted, are valid PromQL:
    promtool parses them as recording rules."""
    rules = [
        {"record": f"check:query:n{i}", "expr": expr}
        for i, (_, expr) in enumerate(promql.all_queries())
    ]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    promtool("check", "rules", str(path), cwd=tmp_path)


def test_queries_use_only_instrumented_metrics():
    """Every maskstream_* sample a rule or panel reads is defined in the code."""
    exported = promql.instrumented_names()
    assert "maskstream_produced_batches_total" in exported, "metric definitions not found"
    unknown = {
        where: sorted(names)
        for where, expr in promql.all_queries() + promql.alert_queries()
        if (names := promql.metric_names(expr, "maskstream_") - exported)
    }
    assert unknown == {}
