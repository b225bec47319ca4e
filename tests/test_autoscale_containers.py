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
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

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
    # It starts only when its profile is asked for, which no other service shares.
    others = {
        p for name, s in services.items() if name != "autoscaler" for p in s.get("profiles", [])
    }
    assert autoscaler["profiles"] and not set(autoscaler["profiles"]) & others
    # The producers' image, which carries the docker SDK for it, built the same way everywhere.
    assert autoscaler["image"] == services["producer"]["image"]
    dockerfile = (REPO / "deploy/docker/producer.Dockerfile").read_text()
    assert '".[autoscaler]"' in dockerfile
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
    socket_path = autoscaler["environment"]["DOCKER_HOST"].removeprefix("unix://")
    assert any(v.split(":")[1] == socket_path for v in autoscaler["volumes"])
    # The engine socket is root on the host: only the autoscaler mounts it (as root, see the
    # note in docker-compose.yml).
    assert autoscaler["user"] == "root"
    for name, service in services.items():
        if name != "autoscaler":
            assert not any("docker.sock" in str(v) for v in service.get("volumes", [])), name


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
    # Root in the autoscaler only (the engine socket's owner; see docker-compose.yml).
    assert stack.cli("exec", autoscaler, "id", "-u").strip() == "0"

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
