"""Grafana provisioning and dashboards: structure (no Grafana server here) and
that the committed JSON is what deploy/grafana/generate.py makes."""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.parse

import pytest
import yaml

from tests import promql
from tests.helpers import COMPOSE_ENV, compose_config

GRAFANA_DIR = promql.ROOT / "deploy" / "grafana"
UIDS = {"pipeline.json": "maskstream-pipeline", "training.json": "maskstream-training"}
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Grafana unit ids these dashboards may use (a typo renders as a plain number).
UNITS = {"short", "none", "ops", "reqps", "Bps", "bytes", "s", "ms", "percentunit", "sci"}
SDK_REQUIREMENT = "grafana-foundation-sdk==1769699379!11.6.0"

BOARDS = promql.dashboards()


def test_the_two_dashboards_with_stable_uids():
    assert {name: board["uid"] for name, board in BOARDS.items()} == UIDS


def test_datasource_provisioning_reaches_the_stacks_prometheus():
    """The provisioned datasource is the stack's Prometheus (the compose service, on the port
    it listens on), the one the dashboards' datasource variable picks by default, and it
    knows the scrape interval that $__rate_interval is derived from."""
    config = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "datasource.yml").read_text()
    )
    (source,) = config["datasources"]
    url = urllib.parse.urlsplit(source["url"])
    services = compose_config(COMPOSE_ENV)["services"]
    prometheus = services[url.hostname]  # the service that runs deploy/prometheus's config
    assert any(v.startswith("./deploy/prometheus:") for v in prometheus["volumes"])
    assert url.port == 9090  # Prometheus's default listen port; the service sets no other
    assert not any("web.listen-address" in arg for arg in prometheus["command"])
    for board in BOARDS.values():
        variable = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
        assert variable["query"] == source["type"]
    assert source["isDefault"] is True  # the variable's default: the default datasource
    scrape = yaml.safe_load((promql.ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]


def test_dashboard_provisioning_reads_the_mounted_dashboards():
    config = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml").read_text()
    )
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    grafana = compose_config(COMPOSE_ENV)["services"]["grafana"]
    mounted = {
        target: source
        for source, target, *_ in (volume.split(":") for volume in grafana["volumes"])
    }
    assert mounted[provider["options"]["path"]] == "./deploy/grafana/dashboards"


@pytest.mark.parametrize("name", sorted(UIDS))
def test_datasource_variable_used_by_every_panel_and_target(name):
    board = BOARDS[name]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # File provisioning resolves no exported-dashboard inputs.
    text = json.dumps(board)
    assert "__inputs" not in board and "${DS_" not in text
    for panel in promql.panels(board):
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE_REF, panel["title"]


@pytest.mark.parametrize("name", sorted(UIDS))
def test_panels_have_units_queries_and_unique_titles(name):
    board = BOARDS[name]
    titles = [panel["title"] for panel in board["panels"]]
    assert len(titles) == len(set(titles)), "duplicate titles"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    for panel in promql.panels(board):
        where = f"{name}: {panel['title']}"
        assert panel["fieldConfig"]["defaults"].get("unit") in UNITS, where
        assert panel.get("description"), where
        targets = panel["targets"]
        assert targets and all(t["expr"].strip() for t in targets), where
        ref_ids = [t["refId"] for t in targets]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), where


@pytest.mark.parametrize("name", sorted(UIDS))
def test_panels_do_not_overlap(name):
    taken: dict[tuple[int, int], str] = {}
    for panel in BOARDS[name]["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_queries_are_extracted():
    queries = promql.all_queries()
    targets = sum(len(p["targets"]) for b in BOARDS.values() for p in promql.panels(b))
    records = sum(1 for _, rule in promql.rules() if "record" in rule)
    assert len(queries) == targets + records
    assert not any("$" in expr for _, expr in queries)


def test_committed_json_is_the_generators_output():
    if importlib.util.find_spec("grafana_foundation_sdk") is None:
        pytest.fail(
            f"grafana-foundation-sdk is not installed: pip install '{SDK_REQUIREMENT}' "
            "(the flavour for Grafana 11.6; it is in the dev extras)"
        )
    # deploy/ is no package: load the script as a module (registered, for its dataclass)
    name = "maskstream_grafana_generate"
    spec = importlib.util.spec_from_file_location(name, GRAFANA_DIR / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    sys.modules[name] = generate
    try:
        spec.loader.exec_module(generate)
    finally:
        del sys.modules[name]
    rendered = generate.render_all()
    assert set(rendered) == set(UIDS)
    for name, text in rendered.items():
        committed = (GRAFANA_DIR / "dashboards" / name).read_text()
        assert committed == text, (
            f"deploy/grafana/dashboards/{name} differs from the generator's output: "
            "run python deploy/grafana/generate.py and commit both"
        )
