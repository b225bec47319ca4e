"""Prometheus configuration, recording rules and alerts, checked offline with
promtool (Debian/Ubuntu: apt-get install prometheus), and the rule files'
conventions: names, labels, annotations, a promtool test for every rule. The
scrape jobs are checked against the compose file: every service that serves
metrics is scraped where it listens."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import promql
from tests.helpers import COMPOSE_ENV, compose_config, service_settings

PROM_DIR = promql.ROOT / "deploy" / "prometheus"
RULE_FILES = sorted(promql.RULES_DIR.glob("*.yml"))
TEST_FILES = sorted((PROM_DIR / "tests").glob("*.yml"))
CONFIG = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
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


def test_every_rule_file_is_loaded_by_a_promtool_test():
    assert RULE_FILES and TEST_FILES, "no rule files, or no promtool tests for them"
    loaded = {
        (path.parent / name).resolve()
        for path in TEST_FILES
        for name in yaml.safe_load(path.read_text())["rule_files"]
    }
    assert {p.resolve() for p in RULE_FILES} <= loaded


def test_promtool_check_config():
    out = promtool("check", "config", "prometheus.yml")
    for rule_file in RULE_FILES:  # rule_files: rules/*.yml must pick up both
        assert f"rules/{rule_file.name}" in out


def test_promtool_check_rules():
    promtool("check", "rules", *(str(p.relative_to(PROM_DIR)) for p in RULE_FILES))


def test_promtool_test_rules():
    promtool("test", "rules", *(str(p.relative_to(PROM_DIR)) for p in TEST_FILES))


def test_prometheus_scrapes_every_service_on_the_port_it_serves():
    """Each compose service that serves metrics is a target of a scrape job, on the port its
    process listens on (our services: their settings, as compose passes them), and every
    name the jobs look up is a compose service."""
    compose = compose_config(COMPOSE_ENV)
    services = compose["services"]
    for name in ("redis-exporter", "prometheus"):  # both listen on their default port
        assert not any("web.listen-address" in arg for arg in services[name]["command"]), name
    serves = {
        "producer": service_settings(compose, "producer").metrics_port,
        "trainer": service_settings(compose, "trainer").trainer_metrics_port,
        "trainer-cpu": service_settings(compose, "trainer-cpu").trainer_metrics_port,
        "autoscaler": service_settings(compose, "autoscaler").autoscaler_metrics_port,
        "redis-exporter": 9121,  # redis_exporter's default listen port
        "prometheus": 9090,  # Prometheus's default listen port
    }
    for name, port in serves.items():
        if "expose" in services[name]:
            assert str(port) in map(str, services[name]["expose"]), name

    scraped: dict[str, int] = {}
    for job in CONFIG["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            # dns_sd_configs defaults to SRV records, which compose DNS does not serve
            assert sd.get("type") == "A" and "port" in sd, job["job_name"]
            scraped.update(dict.fromkeys(sd["names"], sd["port"]))
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                scraped["prometheus" if host == "localhost" else host] = int(port)
    assert scraped == serves


def test_every_range_spans_several_scrapes():
    """rate() needs two samples in its range, and a missed scrape should not empty it:
    every range a rule or panel uses covers at least 4 scrape intervals."""
    interval = _seconds(CONFIG["global"]["scrape_interval"])
    queries = promql.all_queries() + promql.alert_queries()
    ranges = {
        (where, r) for where, expr in queries for r in re.findall(r"\[(\d+[smhdw])[:\]]", expr)
    }
    assert ranges, "no range selectors found"
    short = sorted((where, r) for where, r in ranges if _seconds(r) < 4 * interval)
    assert not short, f"ranges under 4 x {interval:g} s: {short}"


def _seconds(duration: str) -> float:
    value, unit = int(duration[:-1]), duration[-1]
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


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
