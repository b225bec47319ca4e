"""The native stack: redis-server, two producers, a two-rank CPU trainer
(torchrun, gloo), the Redis exporter, a dry-run autoscaler (no container
engine: it counts the producers Prometheus scrapes) and a real Prometheus
running the project's own config (only its target addresses adapted) and
rules. Every PromQL expression of every dashboard panel and recording rule
must return data, and the autoscaler must see what the stack does (producers
outpacing the trainers) and decide accordingly. Redis runs the stack's ACL file
(deploy/redis/acl.sh) and every service connects as its own role's user, with
its password file: Redis must refuse none of them anything (ACL LOG).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from services.autoscaler.policy import PolicyConfig
from services.autoscaler.signals import read_signals
from shared.codec import Batch, encode
from shared.redis_server import free_port
from shared.streams import PAYLOAD_FIELD, StreamKeys
from tests.helpers import (
    REPO,
    SMALL_RECIPE,
    AclRedisServer,
    generate_acl,
    newest_redis_binary,
    wait_until,
    write_role_secrets,
)
from tests.promql import all_queries

pytestmark = pytest.mark.slow

KEYS = StreamKeys("maskstream")
SMALL = [*SMALL_RECIPE, "--eval_interval=20", "--max_backlog=64"]
# The autoscaler's rate window: rates over a window longer than the series' history
# underestimate (the backpressure share of producers 20 s old reads a third of its value
# over 1m), and this test runs for well under a minute before it looks.
WINDOW = "20s"


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: apt-get install {package}")
    return path


def adapted_config(tmp: Path, targets: dict[str, list[str]]) -> Path:
    """deploy/prometheus/prometheus.yml with its discovery replaced by these
    addresses; everything else (intervals, rules) as shipped."""
    source = REPO / "deploy" / "prometheus"
    config = yaml.safe_load((source / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(targets), f"the shipped config scrapes {sorted(jobs)}"
    for job in config["scrape_configs"]:
        for key in ("dns_sd_configs", "static_configs", "docker_sd_configs"):
            job.pop(key, None)
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    shutil.copytree(source / "rules", tmp / "rules")
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def log_to(path: Path):
    """A log file for a child process, which holds it until it exits."""
    return open(path, "w")


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture
def acl_redis(tmp_path):
    """(Redis 7 running the stack's ACL users, the directory of their password files)."""
    secrets_dir = tmp_path / "secrets"
    passwords = write_role_secrets(secrets_dir)
    aclfile = generate_acl(secrets_dir, tmp_path / "users.acl")
    server = AclRedisServer(
        newest_redis_binary(), aclfile, passwords["admin"], workdir=tmp_path / "redis"
    ).start()
    yield server, secrets_dir
    server.kill()


def as_role(secrets_dir: Path, role: str) -> list[str]:
    return [f"--redis_username={role}", f"--redis_password_file={secrets_dir}/redis-{role}"]


def test_every_panel_and_recording_rule_returns_data(
    acl_redis, shakespeare, start_producer, tmp_path
):
    redis7, secrets_dir = acl_redis
    prometheus = need("prometheus", "prometheus")
    exporter_bin = need("prometheus-redis-exporter", "prometheus-redis-exporter")
    ports = {
        name: free_port()
        for name in ("p0", "p1", "trainer", "exporter", "autoscaler", "prometheus")
    }
    client = redis7.client()  # as admin
    # A dead letter to be: the dead-letter panels and rules need a series.
    client.xadd(KEYS.train, {PAYLOAD_FIELD: encode(Batch("f" * 16, "train", 0, 0, 0, {}))})
    common = [f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL]
    for name in ("p0", "p1"):
        start_producer(*common, *as_role(secrets_dir, "producer"), f"--metrics_port={ports[name]}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # redis_exporter's password file: a JSON map of address -> password (as make-env.sh writes).
    exporter_password_file = tmp_path / "exporter.json"
    exporter_password_file.write_text(
        json.dumps({redis7.url: (secrets_dir / "redis-exporter").read_text()})
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "services.trainer",
                *common,
                *as_role(secrets_dir, "trainer"),
                "--max_iters=100000",
                "--log_interval=50",
                f"--trainer_metrics_port={ports['trainer']}",
                f"--out_dir={tmp_path / 'run'}",
            ],
            cwd=REPO,
            env=env,
            stdout=log_to(tmp_path / "trainer.log"),
            stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [
                exporter_bin,
                f"-redis.addr={redis7.url}",
                "-redis.user=exporter",
                f"-redis.password-file={exporter_password_file}",
                f"-web.listen-address=127.0.0.1:{ports['exporter']}",
                "-check-single-streams=maskstream:train,maskstream:val,maskstream:dead",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_to(tmp_path / "exporter.log"),
        ),
    ]
    local = "127.0.0.1:{}".format
    config = adapted_config(
        tmp_path,
        {
            "producer": [local(ports["p0"]), local(ports["p1"])],
            "trainer": [local(ports["trainer"])],
            "autoscaler": [local(ports["autoscaler"])],
            "redis": [local(ports["exporter"])],
            "prometheus": [local(ports["prometheus"])],
        },
    )
    procs.append(
        subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_to(tmp_path / "prometheus.log"),
        )
    )
    base = f"http://127.0.0.1:{ports['prometheus']}"
    # A dry run with no reachable engine falls back to Prometheus for the producer count.
    no_engine = {**env, "DOCKER_HOST": "unix:///nonexistent.sock"}
    for variable in ("DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"):
        no_engine.pop(variable, None)
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.autoscaler",
                "--dry_run",
                f"--redis_url={redis7.url}",
                *as_role(secrets_dir, "autoscaler"),
                f"--prometheus_url={base}",
                f"--autoscaler_metrics_port={ports['autoscaler']}",
                "--autoscale_interval_s=1",
                f"--rate_window={WINDOW}",
                "--max_backlog=64",
            ],
            cwd=REPO,
            env=no_engine,
            stdout=log_to(tmp_path / "autoscaler.log"),
            stderr=subprocess.STDOUT,
        )
    )
    try:

        def all_up() -> bool:
            try:
                result = query(base, "up")["data"]["result"]
            except OSError:
                return False
            return len(result) == 6 and all(r["value"][1] == "1" for r in result)

        wait_until(all_up, 120, "all six targets up", interval=1)
        wait_until(
            lambda: query(base, "max(maskstream_trainer_val_loss)")["data"]["result"],
            180,
            "a validation loss from the trainer",
            interval=1,
        )
        time.sleep(15)  # several scrapes: every rate window holds at least two samples
        failures = []
        queries = all_queries()
        assert len(queries) > 20
        for where, expr in queries:
            answer = query(base, expr)
            if answer.get("status") != "success":
                failures.append(f"{where}: error {answer.get('error')}: {expr}")
            elif not answer["data"]["result"]:
                failures.append(f"{where}: no data: {expr}")
        assert not failures, "\n".join(failures)
        # The dry-run autoscaler decides, and counts the two producers Prometheus scrapes.
        assert query(base, "maskstream_autoscaler_decisions_total")["data"]["result"]

        def counted() -> list[str]:
            result = query(base, "maskstream_autoscaler_actual_producers")["data"]["result"]
            return [r["value"][1] for r in result]

        wait_until(lambda: counted() == ["2"], 30, "the autoscaler to count 2 producers", 1)
        signals_seen = query(base, "maskstream_autoscaler_signal")["data"]["result"]
        assert {r["metric"]["signal"] for r in signals_seen} == {
            "data_wait_share",
            "consumed_per_s",
            "produced_per_s",
            "backpressure_share",
            "queue_fill",
        }

        # Two producers outpace the two trainer ranks: the dry-run autoscaler, watching this
        # stack, asks for fewer producers (its reason label in Prometheus) ...
        def asked_for_fewer() -> list:
            expr = 'maskstream_autoscaler_decisions_total{reason="queue_full"}'
            return query(base, expr)["data"]["result"]

        wait_until(asked_for_fewer, 90, "the autoscaler's queue_full decision", interval=1)
        # ... because, as the same signals read here from Prometheus and Redis show, the
        # stream sits at its bound, the producers mostly wait on backpressure and the
        # trainers are fed.
        config = PolicyConfig()

        def at_the_bound():
            seen = read_signals(
                base, client, KEYS.train, producers=2, max_backlog=64, window=WINDOW
            )
            return seen if seen.queue_length >= config.full_fraction * 64 else None

        # The stream's length moves with every step and send: it keeps returning to the bound.
        signals = wait_until(at_the_bound, 30, "the stream at its bound", interval=0.2)
        assert signals.consumed_per_s > 0 and signals.produced_per_s > 0
        assert not signals.missing()
        assert signals.backpressure_share >= config.idle_backpressure, signals
        assert signals.data_wait_share <= config.starve_threshold, signals
        # Every service worked as its own user (the exporter's series above came through
        # its own, which connects per scrape), and Redis refused none of them anything.
        users = {c["user"] for c in client.client_list()}
        assert users >= {"producer", "trainer", "autoscaler"}, users
        assert client.acl_log() == []
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
