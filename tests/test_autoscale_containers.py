"""The autoscaler in the compose stack, on Podman's Docker API (``make test-autoscale``) and
on Docker Engine's (``make test-docker``); CI runs both.

- Checks of the ``autoscaler`` service in docker-compose.yml as compose reads it (profile,
  image, entrypoint, engine socket, the settings it gets), without a container engine.
- The stack itself, built and run like tests/test_containers.py (root, the engine
  MASKSTREAM_ENGINE names, a debootstrapped Debian base, the air-gapped override; the same
  helpers and image cache), plus: the engine's Docker API mounted into the autoscaler
  (profile ``autoscale``): for podman its Docker-compatible API (``podman system service``)
  on a private socket, for Docker Engine dockerd's own socket (DOCKER_HOST or
  /var/run/docker.sock); ONE producer rate-limited to RATE_LIMIT batches/s,
  which starves the CPU trainer (the tiny preset eats 5-9 batches/s here); the trainer's
  iteration limit lifted so it trains for the whole test.

  1. Up: the producer count must rise, seen in the engine's container list (compose labels,
     through the docker SDK, and the engine's CLI), in Prometheus (``up`` of the producer job) and
     in the autoscaler's ``actual_producers``, until the trainer's data-wait share
     (Prometheus, over RATE_WINDOW) is under the threshold.
  2. Down: the trainer is paused (``podman pause`` / ``docker pause``): nobody consumes, the
     queue fills, the
     producers wait on backpressure, and the autoscaler must bring them back to the minimum.

  Every sample (every SAMPLE_S) must see the count within [MIN_PRODUCERS, MAX_PRODUCERS]; the
  samples are printed as a timeline. Marked ``container``: collected only with
  MASKSTREAM_CONTAINER_TEST=1, which ``make test-autoscale`` and ``make test-docker`` set
  (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import re
import shutil
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from shared.redis_server import free_port
from tests.helpers import (
    BASE_IMAGE,
    COMPOSE_ENV,
    COMPOSE_FILES,
    ENGINE,
    PROJECT,
    REPO,
    Prometheus,
    Stack,
    compose_config,
    docker_socket,
    require_container_tools,
    run_logged,
    service_settings,
    stack_env,
    torch_cpu_wheel,
    wait_until,
)

MIN_PRODUCERS = 1
MAX_PRODUCERS = 6
# Batches/s per producer. The trainer eats 5-9 batches/s in its container here (2 cores shared
# with the producers, Prometheus and the API): one producer starves it, 3-4 feed it, and the
# maximum leaves room above that, so the test sees sizing, not clamping.
RATE_LIMIT = 3
STARVE_THRESHOLD = 0.05
# The policy wants cooldown_s > the rates' window + a replica's start-up (a few seconds
# here): otherwise a step is sized from rates that do not show the previous one yet.
RATE_WINDOW = "20s"
AUTOSCALE = {
    "MIN_PRODUCERS": str(MIN_PRODUCERS),
    "MAX_PRODUCERS": str(MAX_PRODUCERS),
    "STARVE_THRESHOLD": str(STARVE_THRESHOLD),
    "RATE_WINDOW": RATE_WINDOW,
    "AUTOSCALE_INTERVAL_S": "3",
    "COOLDOWN_S": "30",
    "CONFIRM": "2",
}
SAMPLE_S = 3.0
UP_TIMEOUT_S = 420  # from `up` to a fed trainer
DOWN_TIMEOUT_S = 240  # from the pause to the minimum

# What only this test changes: the producers' rate limit, and a trainer that outlives it
# (the tiny preset stops after 1000 iterations, about two minutes).
OVERRIDE = f"""\
services:
  producer:
    environment:
      RATE_LIMIT: "{RATE_LIMIT}"
  trainer-cpu:
    environment:
      MAX_ITERS: "1000000"
      LR_DECAY_ITERS: "1000000"
"""


def _say(pytestconfig, message: str) -> None:
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"[autoscale {ENGINE}] {message}", flush=True)


# ------------------------------------------------------------------ static checks


def autoscaler_settings(config: dict):
    return service_settings(config, "autoscaler")


def test_autoscaler_service():
    config = compose_config(COMPOSE_ENV)
    services = config["services"]
    autoscaler = services["autoscaler"]
    # It starts only when its profile is asked for, which no other service shares but its
    # engine proxy.
    others = {
        p
        for name, s in services.items()
        if name not in ("autoscaler", "engine-proxy")
        for p in s.get("profiles", [])
    }
    assert autoscaler["profiles"] and not set(autoscaler["profiles"]) & others
    # The producers' image, which carries the docker SDK for it, built the same way everywhere.
    assert autoscaler["image"] == services["producer"]["image"]
    dockerfile = (REPO / "deploy/docker/producer.Dockerfile").read_text()
    assert "requirements/producer.txt" in dockerfile  # with the autoscaler extra: the SDK
    pinned = (REPO / "deploy/docker/requirements/producer.txt").read_text()
    assert re.search(r"^docker==", pinned, re.M)
    airgap = compose_config({**COMPOSE_ENV, "CORPUS_FILE": "/corpus.txt"}, REPO / COMPOSE_FILES[1])
    for built in (config, airgap):
        assert built["services"]["autoscaler"]["build"] == built["services"]["producer"]["build"]
    # Its entrypoint starts the autoscaler (here with this interpreter for the image's python).
    program, *args = autoscaler["entrypoint"]
    assert program == "python"
    started = subprocess.run(
        [sys.executable, *args, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0 and "autoscale_interval_s" in started.stdout, started.stderr
    # Its settings, as compose passes them, name this project, a scalable service, the
    # prometheus service on Prometheus's port and the engine socket it mounts.
    settings = autoscaler_settings(config)
    assert settings.compose_project == config["name"]
    assert "replicas" in services[settings.producer_service]["deploy"]
    url = urllib.parse.urlsplit(settings.prometheus_url)
    assert url.hostname in services and url.port == 9090  # Prometheus's default listen port
    assert not any(a.startswith("--web.listen-address") for a in services[url.hostname]["command"])
    # The engine socket is root on the host: only the proxy mounts it, and the autoscaler,
    # a non-root user, reaches the engine through the proxy (same profile) only.
    assert autoscaler["environment"]["DOCKER_HOST"] == "tcp://engine-proxy:2375"
    assert autoscaler.get("user") is None  # the image's: maskstream, uid 10001
    assert "volumes" not in autoscaler
    proxy = services["engine-proxy"]
    assert (
        proxy["profiles"] == autoscaler["profiles"] and "engine-proxy" in autoscaler["depends_on"]
    )
    assert "2375" in proxy["expose"] and "ports" not in proxy
    assert any(v.split(":")[1] == "/var/run/docker.sock" for v in proxy["volumes"])
    assert proxy["command"][-1] == "/etc/maskstream/engine-proxy/haproxy.cfg"
    for name, service in services.items():
        if name != "engine-proxy":
            assert not any(".sock" in str(v) for v in service.get("volumes", [])), name


def test_the_knobs_this_test_turns_reach_the_autoscaler():
    """Each AUTOSCALE variable, set in the compose environment to a value other than its
    default, becomes that setting of the autoscaler."""
    defaults = autoscaler_settings(compose_config(COMPOSE_ENV))
    for name in AUTOSCALE:
        default = getattr(defaults, name.lower())
        if isinstance(default, str):  # a duration such as RATE_WINDOW's "1m"
            value = "17s"
        else:
            value = str(default + 1 if isinstance(default, int) else default / 2)
        settings = autoscaler_settings(compose_config({**COMPOSE_ENV, name: value}))
        got = getattr(settings, name.lower())
        assert got != default and got == type(default)(value), (name, got, value)


# ------------------------------------------------------- the stack on podman or docker


@dataclass
class Sample:
    t: float  # seconds since `up`
    phase: str
    engine: int  # running producers, docker SDK, compose labels
    cli: int  # the same from the engine's CLI (`podman ps` / `docker ps`)
    prom_up: float | None  # count(up{job="producer"} == 1)
    actual: float | None  # maskstream_autoscaler_actual_producers
    desired: float | None
    wait: float | None  # the trainer's data-wait share over RATE_WINDOW
    queue: float | None  # maskstream:train length (the exporter's)
    reasons: str  # decisions since the previous sample, by reason

    HEADER = "     t  phase    engine    cli prom_up actual desired   wait queue  decisions"

    def row(self) -> str:
        def num(v: float | None, width: int) -> str:
            return f"{v:{width}.0f}" if v is not None else " " * (width - 1) + "-"

        wait = f"{100 * self.wait:5.1f}%" if self.wait is not None else "     -"
        return (
            f"{self.t:5.0f}s  {self.phase:7}  {self.engine:6d} {self.cli:6d} "
            f"{num(self.prom_up, 7)} {num(self.actual, 6)} {num(self.desired, 7)} "
            f"{wait} {num(self.queue, 5)}  {self.reasons}"
        )


@dataclass
class Rig:
    stack: Stack
    engine: object  # docker.DockerClient on the engine's API (Podman's or dockerd's)
    prom: Prometheus
    pytestconfig: object
    started: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    _decisions: dict[str, float] = field(default_factory=dict)

    def running_producers(self) -> tuple[int, int]:
        """Running producer replicas: the docker SDK with the compose labels (what the
        autoscaler counts), and the engine's CLI list."""
        from services.autoscaler.engine import PROJECT_LABEL, SERVICE_LABEL

        labels = [f"{PROJECT_LABEL}={PROJECT}", f"{SERVICE_LABEL}=producer"]
        sdk = self.engine.containers.list(filters={"label": labels, "status": "running"})
        return len(sdk), len(self.stack.containers("producer", running=True))

    def decisions(self) -> str:
        """Decisions since the last call, by reason (from the autoscaler's counter)."""
        result = self.prom._get("query", query="maskstream_autoscaler_decisions_total")
        now = {
            s["metric"].get("reason", "?"): float(s["value"][1]) for s in result.get("result", [])
        }
        new = {r: v - self._decisions.get(r, 0.0) for r, v in now.items()}
        self._decisions = now
        return " ".join(f"{r}:{n:.0f}" for r, n in sorted(new.items()) if n > 0)

    def sample(self, phase: str) -> Sample:
        engine, listed = self.running_producers()
        w = RATE_WINDOW
        wait = self.prom.value(
            f"sum(rate(maskstream_trainer_data_wait_seconds_sum[{w}])) "
            f"/ sum(rate(maskstream_trainer_step_seconds_sum[{w}]))"
        )
        sample = Sample(
            t=time.monotonic() - self.started,
            phase=phase,
            engine=engine,
            cli=listed,
            prom_up=self.prom.value('count(up{job="producer"} == 1)'),
            actual=self.prom.value("maskstream_autoscaler_actual_producers"),
            desired=self.prom.value("maskstream_autoscaler_desired_producers"),
            wait=None if wait is None or math.isnan(wait) else wait,
            queue=self.prom.value('redis_stream_length{stream="maskstream:train"}'),
            reasons=self.decisions(),
        )
        self.samples.append(sample)
        _say(self.pytestconfig, sample.row())
        self.check_bounds(sample)
        return sample

    def check_bounds(self, s: Sample) -> None:
        counts = {"engine": s.engine, "cli": s.cli, "prom_up": s.prom_up}
        if self._decisions:  # the gauges are 0 until the autoscaler's first decision
            counts |= {"actual": s.actual, "desired": s.desired}
        for name, count in counts.items():
            if count is not None and not MIN_PRODUCERS <= count <= MAX_PRODUCERS:
                self.fail(f"{name} = {count} left [{MIN_PRODUCERS}, {MAX_PRODUCERS}]")

    def timeline(self) -> str:
        return "\n".join([Sample.HEADER, *(s.row() for s in self.samples)])

    def autoscaler_log(self) -> str:
        names = self.stack.containers("autoscaler")
        if not names:
            return "(no autoscaler container)"
        out = subprocess.run(
            [self.stack.engine, "logs", names[0]],
            env=self.stack.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout + out.stderr

    def fail(self, why: str) -> None:
        pytest.fail(
            f"{why}\n\ntimeline:\n{self.timeline()}\n\nautoscaler log:\n"
            f"{self.autoscaler_log()[-6000:]}\n\n{self.stack.logs()}"
        )


def _start_api(sock: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`podman system service` on ``sock`` (no idle timeout), in the background."""
    args = ["podman", "system", "service", "--time=0", f"unix://{sock}"]
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop_autoscaler(stack: Stack) -> None:
    """Before anything else stops: it would replace the producers a teardown stops."""
    names = stack.containers("autoscaler")
    if names:
        stack.cli("stop", "-t", "30", *names, check=False)


def _stop_api(api: subprocess.Popen) -> None:
    if api.poll() is None:
        api.terminate()
        try:
            api.wait(timeout=30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait(timeout=30)


@pytest.fixture(scope="module")
def rig(tmp_path_factory, pytestconfig) -> Iterator[Rig]:
    require_container_tools()
    tmp = tmp_path_factory.mktemp("autoscale")
    log = tmp / f"{ENGINE}.log"
    # Podman: a private API socket (the machine's own stays untouched); Docker: dockerd's own.
    sock = tmp / "podman.sock" if ENGINE == "podman" else docker_socket()
    override = tmp / "autoscale.yml"
    override.write_text(OVERRIDE)
    env = stack_env(
        tmp, MIN_PRODUCERS, COMPOSE_PROJECT_NAME=PROJECT, DOCKER_SOCKET=str(sock), **AUTOSCALE
    )
    if ENGINE == "podman":
        env.pop("DOCKER_HOST", None)
    stack = Stack(env, log)
    # test_containers.py's stack, plus this test's override file and the autoscale profile.
    at = stack.compose.index("--profile")
    stack.compose[at:at] = ["-f", str(override)]
    stack.compose += ["--profile", "autoscale"]
    _say(pytestconfig, f"log: {log}")

    started = time.monotonic()
    seconds = run_logged(["deploy/docker/debian-base.sh", BASE_IMAGE], env, log, timeout=900)
    _say(pytestconfig, f"Debian base image {BASE_IMAGE}: {seconds:.0f} s")
    wheel = torch_cpu_wheel()
    if wheel is not None:
        wheels = REPO / "deploy/docker/wheels"
        if not (wheels / wheel.name).exists():
            shutil.copy2(wheel, wheels / wheel.name)
        env["TORCH_CPU_INDEX_URL"] = ""
    _stop_autoscaler(stack)  # leftovers of an interrupted run (this one or test_containers.py's)
    stack.remove()
    # The autoscaler runs the producer image: three builds, all cached after
    # `make test-containers`.
    for service in ("redis", "producer", "trainer-cpu"):
        seconds = stack("build", service, timeout=1200)
        _say(pytestconfig, f"built {service}'s image: {seconds:.0f} s")

    api = _start_api(sock, env, log) if ENGINE == "podman" else None
    engine = None
    try:
        deadline = time.monotonic() + 60
        while engine is None:
            with contextlib.suppress(docker.errors.DockerException):
                client = docker.DockerClient(base_url=f"unix://{sock}", timeout=60)
                client.ping()
                engine = client
            if engine is None:
                if (api and api.poll() is not None) or time.monotonic() > deadline:
                    tail = "\n".join(log.read_text().splitlines()[-20:])
                    pytest.fail(f"{ENGINE}'s API did not answer on {sock}:\n{tail}")
                time.sleep(0.5)
        version = engine.version()
        _say(
            pytestconfig,
            f"{ENGINE}'s API on {sock}: {version.get('Version')} "
            f"(API {version.get('ApiVersion')}); setup {time.monotonic() - started:.0f} s",
        )
        rig = Rig(stack, engine, Prometheus(int(env["PROMETHEUS_PORT"])), pytestconfig)
        yield rig
    finally:
        torn = time.monotonic()
        for name in stack.containers("trainer-cpu"):
            stack.cli("unpause", name, check=False)
        _stop_autoscaler(stack)
        stack.remove()
        if engine is not None:
            engine.close()
        if api is not None:
            _stop_api(api)
        stack.cli("image", "prune", "-f", "--filter", "label=maskstream.image", check=False)
        _say(pytestconfig, f"torn down: {time.monotonic() - torn:.0f} s")
        assert not stack.containers(), "containers left behind"


@pytest.mark.container
@pytest.mark.slow
def test_autoscaler_feeds_a_starved_trainer_then_scales_back(rig: Rig):
    stack, prom, say = rig.stack, rig.prom, lambda m: _say(rig.pytestconfig, m)
    rig.started = time.monotonic()
    stack("up", "-d")
    say(f"up: {time.monotonic() - rig.started:.0f} s")
    assert len(stack.containers("producer")) == MIN_PRODUCERS
    (autoscaler,) = stack.containers("autoscaler")
    (trainer,) = stack.containers("trainer-cpu")
    # The autoscaler is no root, and the proxy refuses it anything but its own calls.
    assert stack.cli("exec", autoscaler, "id", "-u").strip() != "0"
    probe = (
        "import docker; c = docker.DockerClient(base_url='tcp://engine-proxy:2375'); "
        "c.ping(); print(len(c.containers.list()));\n"
        "for call in (c.images.list, c.volumes.list, c.networks.list, c.info):\n"
        "    try: call(); print('allowed', call.__name__)\n"
        "    except docker.errors.APIError as e: print('refused', e.status_code)"
    )
    answers = stack.cli("exec", autoscaler, "python", "-c", probe).split("\n")
    assert answers[0].strip().isdigit(), answers
    assert [a for a in answers[1:] if a.strip()] == ["refused 403"] * 4, answers

    def until(phase: str, done, timeout: float, what: str) -> Sample:
        deadline = time.monotonic() + timeout
        while True:
            sample = rig.sample(phase)
            if done(sample):
                return sample
            if time.monotonic() > deadline:
                rig.fail(f"{phase}: no {what} after {timeout:.0f} s")
            time.sleep(SAMPLE_S)

    say(Sample.HEADER)
    # 1. One producer starves the trainer: the count rises until the wait share is under
    # the threshold, and every view of the count agrees.
    fed = until(
        "starved",
        lambda s: (
            s.engine > MIN_PRODUCERS
            and s.wait is not None
            and s.wait < STARVE_THRESHOLD
            and s.engine == s.cli == s.prom_up == s.actual
        ),
        UP_TIMEOUT_S,
        f"trainer fed (wait share < {STARVE_THRESHOLD:.0%}) with the counts agreeing",
    )
    starved = [s.wait for s in rig.samples if s.wait is not None and s.engine == MIN_PRODUCERS]
    assert starved and max(starved) > STARVE_THRESHOLD, "the trainer was never starved"
    peak = max(s.engine for s in rig.samples)
    fed_at = fed.t
    say(f"fed with {fed.engine} producers after {fed_at:.0f} s (peak {peak})")
    _replicas_keep_the_hardening(rig)
    # Prometheus finds the autoscaler by its service name, on 9300.
    (target,) = prom.targets("autoscaler").items()
    assert target[0].endswith(":9300") and target[1] == "up", target

    # 2. Nobody consumes: the queue fills, producers wait on backpressure, back to the minimum.
    stack.cli("pause", trainer)
    paused_at = time.monotonic() - rig.started
    say(f"paused {trainer} at {paused_at:.0f} s")
    try:
        low = until(
            "paused",
            lambda s: s.engine == s.cli == s.prom_up == s.actual == MIN_PRODUCERS,
            DOWN_TIMEOUT_S,
            f"scale-down to {MIN_PRODUCERS} producer(s)",
        )
    finally:
        stack.cli("unpause", trainer, check=False)
    say(f"back to {low.engine} after {low.t - paused_at:.0f} s paused")

    changes = [
        line
        for line in rig.autoscaler_log().splitlines()
        if re.search(r"\d+ -> \d+ producers|started |stopped and removed", line)
    ]
    say("autoscaler changes:\n" + "\n".join(changes))
    say(
        f"timeline ({len(rig.samples)} samples every ~{SAMPLE_S:.0f} s):\n{rig.timeline()}\n"
        f"summary: fed after {fed_at:.0f} s at {fed.engine} producers (peak {peak}), "
        f"paused at {paused_at:.0f} s, at {MIN_PRODUCERS} after {low.t - paused_at:.0f} s, "
        f"total {time.monotonic() - rig.started:.0f} s"
    )
    assert MIN_PRODUCERS < peak <= MAX_PRODUCERS
    # Both changes were the autoscaler's, for the expected reasons.
    for pattern in (r"starving: 1 -> \d+ producers", rf"queue_full: \d+ -> {MIN_PRODUCERS} "):
        assert any(re.search(pattern, line) for line in changes), (pattern, changes)


# ------------------------------------------------------------------ the engine proxy

PROXY_CFG = REPO / "deploy/engine-proxy/haproxy.cfg"


class _FakeEngine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """An 'engine' on a unix socket that answers 200 to anything and records the requests:
    what reaches it got through the proxy."""

    daemon_threads = True

    def __init__(self, path: Path) -> None:
        self.seen: list[str] = []
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                engine.seen.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_HEAD = do_POST = do_DELETE = do_PUT = _any

            def address_string(self) -> str:
                return "engine"

            def log_message(self, *args) -> None:
                pass

        super().__init__(str(path), Handler)


def test_the_engine_proxy_allows_exactly_the_autoscalers_calls(tmp_path):
    """deploy/engine-proxy/haproxy.cfg, run by a real haproxy in front of a fake engine: the
    calls the autoscaler makes pass; exec, images, volumes, networks, kill, archive and a
    create that asks for privileges are refused (403) and never reach the engine."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.fail("haproxy not found: apt-get install haproxy")
    sock = tmp_path / "engine.sock"
    engine = _FakeEngine(sock)
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    port = free_port()
    cfg = PROXY_CFG.read_text()
    assert "bind :2375" in cfg and "server engine /var/run/docker.sock" in cfg
    cfg = cfg.replace("bind :2375", f"bind 127.0.0.1:{port}")
    cfg = cfg.replace("/var/run/docker.sock", str(sock))
    (tmp_path / "haproxy.cfg").write_text(cfg)
    proc = subprocess.Popen(
        [haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    template = {"Image": "producer", "HostConfig": {"CapDrop": ["ALL"], "ReadonlyRootfs": True}}
    allowed = [
        ("GET", "/_ping", None),
        ("HEAD", "/_ping", None),
        ("GET", "/version", None),
        ("GET", "/v1.41/containers/json?filters=%7B%7D", None),
        ("GET", "/v1.41/containers/abc123/json", None),
        ("POST", "/v1.41/containers/create?name=maskstream-producer-3", template),
        ("POST", "/v1.41/containers/abc123/start", None),
        ("POST", "/v1.41/containers/abc123/stop?t=10", None),
        ("DELETE", "/v1.41/containers/abc123", None),
    ]
    escalations = [
        {"HostConfig": {"Privileged": True}},
        {"HostConfig": {"CapAdd": ["SYS_ADMIN"]}},
        {"HostConfig": {"PidMode": "host"}},
        {"HostConfig": {"NetworkMode": "host"}},
        {"HostConfig": {"Binds": ["/var/run/docker.sock:/var/run/docker.sock"]}},
        {"HostConfig": {"Devices": [{"PathOnHost": "/dev/sda"}]}},
    ]
    refused = [
        ("POST", "/v1.41/containers/abc123/exec", {"Cmd": ["sh"]}),
        ("POST", "/v1.41/exec/abc/start", {}),
        ("GET", "/v1.41/images/json", None),
        ("POST", "/v1.41/images/create?fromImage=evil", None),
        ("DELETE", "/v1.41/images/producer", None),
        ("GET", "/v1.41/volumes", None),
        ("POST", "/v1.41/volumes/create", {}),
        ("GET", "/v1.41/networks", None),
        ("POST", "/v1.41/build", None),
        ("POST", "/v1.41/containers/abc123/kill", None),
        ("PUT", "/v1.41/containers/abc123/archive?path=/", None),
        ("GET", "/v1.41/containers/abc123/archive?path=/run/secrets", None),
        ("POST", "/v1.41/containers/abc123/update", {}),
        ("POST", "/v1.41/commit?container=abc123", None),
        ("GET", "/v1.41/containers/abc123/logs", None),
        ("GET", "/v1.41/info", None),
        ("DELETE", "/v1.41/containers/abc123/../../images/x", None),
        *[("POST", "/v1.41/containers/create", {**template, **e}) for e in escalations],
    ]

    def call(method: str, path: str, body: dict | None) -> int:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except urllib.error.URLError:
            return 0  # not listening yet

    try:
        wait_until(lambda: call("GET", "/_ping", None) == 200, 20, "haproxy")
        engine.seen.clear()
        for method, path, body in allowed:
            assert call(method, path, body) == 200, (method, path)
        assert len(engine.seen) == len(allowed)
        for method, path, body in refused:
            assert call(method, path, body) == 403, (method, path, body)
        assert len(engine.seen) == len(allowed), engine.seen[len(allowed) :]
    finally:
        proc.terminate()
        proc.wait(10)
        engine.shutdown()


# What a replica the autoscaler starts must keep from the compose-made one it copies.
HARDENING = (
    "CapDrop",
    "CapAdd",
    "SecurityOpt",
    "ReadonlyRootfs",
    "Tmpfs",
    "Memory",
    "PidsLimit",
    "Privileged",
)


def _replicas_keep_the_hardening(rig: Rig) -> None:
    """Every running producer, those compose made and those the autoscaler added, has the
    same hardening settings and the same mounts (the secret included) and user."""
    producers = rig.engine.containers.list(
        filters={
            "label": [
                f"com.docker.compose.project={PROJECT}",
                "com.docker.compose.service=producer",
            ]
        }
    )
    assert len(producers) > MIN_PRODUCERS
    views = {}
    for container in producers:
        host = container.attrs["HostConfig"]
        mounts = sorted((m["Destination"], m.get("RW")) for m in container.attrs["Mounts"])
        views[container.name] = (
            {key: host.get(key) for key in HARDENING},
            mounts,
            container.attrs["Config"].get("User"),
        )
    first, *others = views.values()
    assert all(view == first for view in others), views
    hardening, mounts, _user = first
    assert hardening["ReadonlyRootfs"] is True and hardening["Memory"] > 0, hardening
    assert any(m[0] == "/run/secrets/redis-producer" for m in mounts), mounts
    _say(rig.pytestconfig, f"{len(producers)} producers, one hardening: {hardening}")


def test_a_copy_keeps_every_hardening_setting_and_mount():
    """What engine.py passes to create for a copy: the template's hardening, mounts and
    limits as the Engine API names them (podman's RLIMIT_ names made the API's), nothing
    unset, nothing else."""
    from services.autoscaler.engine import copied_host_config

    template = {
        "Binds": ["corpus-cache:/cache:rw"],
        "Mounts": [
            {
                "Type": "bind",
                "Source": "/s/redis-producer",
                "Target": "/run/secrets/redis-producer",
                "ReadOnly": True,
            }
        ],
        "Tmpfs": {"/tmp": ""},
        "CapAdd": None,
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges:true"],
        "ReadonlyRootfs": True,
        "Privileged": False,
        "Memory": 536870912,
        "PidsLimit": 64,
        "Ulimits": [{"Name": "RLIMIT_NOFILE", "Soft": 16384, "Hard": 16384}],
        "RestartPolicy": {"Name": "unless-stopped"},
        "NetworkMode": "maskstream_default",
        "PortBindings": {},
        "Devices": [],
    }
    copy = copied_host_config(template)
    for key in ("Binds", "Mounts", "Tmpfs", "CapDrop", "SecurityOpt", "ReadonlyRootfs"):
        assert copy[key] == template[key], key
    assert copy["Memory"] == 536870912 and copy["PidsLimit"] == 64
    assert copy["Privileged"] is False and "CapAdd" not in copy
    assert copy["Ulimits"] == [{"Name": "nofile", "Soft": 16384, "Hard": 16384}]
    assert not {"NetworkMode", "PortBindings", "Devices"} & set(copy)
