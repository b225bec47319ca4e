"""Every PromQL query the monitoring files run, for tests that check them.

- ``all_queries()``: (where, expr) for every target of the Grafana dashboards
  (Grafana's interval variables replaced by ``1m``) and every recording rule:
  the queries that must return data when producers, a trainer and
  redis_exporter run.
- ``alert_queries()``: the alert expressions, empty in a healthy stack.
- ``instrumented_names()``: the sample names our processes export, read from
  the metric definitions in the source (no import: each process has its own
  registry).

Reads the rule files with PyYAML.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
METRIC_SOURCES = ("shared", "services")

# Grafana's built-in interval variables, as the live test evaluates them.
_INTERVALS = re.compile(
    r"\$(?:\{__(?:rate_interval|interval|range)\}|__(?:rate_interval|interval|range)\b)"
)


def substitute(expr: str) -> str:
    """Replace Grafana's interval variables by 1m; refuse any other variable."""
    expr = _INTERVALS.sub("1m", expr)
    if "$" in expr:
        raise ValueError(f"unsupported Grafana variable in {expr!r}")
    return expr


def dashboards() -> dict[str, dict]:
    """File name -> parsed dashboard JSON."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS_DIR.glob("*.json"))}


def panels(board: dict) -> list[dict]:
    """Every panel that is not a row, those inside collapsed rows included."""
    found = []
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for name, board in dashboards().items():
        for panel in panels(board):
            for target in panel.get("targets", []):
                where = f"{name}: {panel['title']} [{target.get('refId', '?')}]"
                queries.append((where, substitute(target["expr"])))
    return queries


def rules() -> list[tuple[str, dict]]:
    """(file name, rule) for every rule of every rule file."""
    found = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            found.extend((path.name, rule) for rule in group["rules"])
    return found


def recording_rule_queries() -> list[tuple[str, str]]:
    return [
        (f"{name}: {rule['record']}", rule["expr"].strip())
        for name, rule in rules()
        if "record" in rule
    ]


def alert_queries() -> list[tuple[str, str]]:
    return [
        (f"{name}: {rule['alert']}", rule["expr"].strip())
        for name, rule in rules()
        if "alert" in rule
    ]


def all_queries() -> list[tuple[str, str]]:
    """(where, expr): every dashboard target and every recording rule."""
    return dashboard_queries() + recording_rule_queries()


_SUFFIXES = {
    "Counter": ("_total",),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "Summary": ("_sum", "_count"),
}


def instrumented_names() -> set[str]:
    """Sample names of every prometheus_client metric defined in shared/ and
    services/ (``Counter("maskstream_x", ...)`` exports ``maskstream_x_total``)."""
    names = set()
    for top in METRIC_SOURCES:
        for path in (ROOT / top).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                func = node.func
                kind = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                first = node.args[0]
                if kind in _SUFFIXES and isinstance(getattr(first, "value", None), str):
                    names.update(first.value + suffix for suffix in _SUFFIXES[kind])
    return names


def metric_names(expr: str, prefix: str) -> set[str]:
    """Names starting with prefix that expr selects (not recording rules, which
    contain colons, nor label names inside braces)."""
    without_labels = re.sub(r"\{[^}]*\}", "{}", expr)
    without_strings = re.sub(r'"[^"]*"', '""', without_labels)
    return set(re.findall(rf"(?<![\w:])({prefix}\w*)(?![\w:])", without_strings))
