"""The container images and the compose stack (``make test-containers``; CI runs it).

Two kinds of tests:

- Static checks of docker-compose.yml, the Dockerfiles and .dockerignore: what the stack
  promises (password, memory bound, scalable producers, GPU reservation, ...). They need
  PyYAML only, which ``make test-containers`` installs with podman-compose.
- The stack itself, on podman, as root, with no container registry: a Debian base made by
  debootstrap and imported (deploy/docker/debian-base.sh), the project's images built on it,
  Redis, the exporter and Prometheus from Debian's packages (deploy/compose/airgap.yml;
  Grafana has no Debian package and stays out), the CPU trainer profile, two producers scaled
  to three. Prometheus's HTTP API must show every producer scraped and the trainer consuming.
  The CUDA trainer image is not built here (no GPU, gigabytes of CUDA wheels): it is the
  same Dockerfile as the CPU trainer built here, and its torch requirement is resolved
  against PyPI for Linux x86_64 (metadata only). These run only with
  MASKSTREAM_CONTAINER_TEST=1, which ``make test-containers`` sets.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ["docker-compose.yml", "deploy/compose/airgap.yml"]
PROJECT = "maskstream-ci"
BASE_IMAGE = "localhost/maskstream-debian:bookworm"
STREAMS = "maskstream:train,maskstream:val,maskstream:dead"

# Collected only by `make test-containers` (tests/conftest.py deselects them elsewhere).
stack_test = pytest.mark.container


def _load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_yaml(REPO / "docker-compose.yml")


# ------------------------------------------------------------------ static checks


def test_redis_requires_a_password_and_bounds_memory(compose):
    redis = compose["services"]["redis"]
    assert "${REDIS_PASSWORD:?" in redis["environment"]["REDIS_PASSWORD"]
    script = " ".join(redis["entrypoint"])
    assert "requirepass $$REDIS_PASSWORD" in script
    command = redis["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert re.fullmatch(r"\$\{REDIS_MAXMEMORY:-\d+mb\}", command[command.index("--maxmemory") + 1])
    # `redis-cli ping` exits 0 on NOAUTH: the check must authenticate and look for PONG.
    check = " ".join(redis["healthcheck"]["test"])
    assert "REDISCLI_AUTH" in check
    assert "PONG" in check


def test_producers_scale(compose):
    producer = compose["services"]["producer"]
    assert "container_name" not in producer
    assert "ports" not in producer
    assert producer["expose"] == ["9100"]
    assert producer["deploy"]["mode"] == "replicated"
    assert "PRODUCER_REPLICAS" in str(producer["deploy"]["replicas"])
    assert producer["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")


def test_trainers(compose):
    services = compose["services"]
    gpu, cpu = services["trainer"], services["trainer-cpu"]
    assert gpu["profiles"] == ["gpu"]
    assert cpu["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert gpu.get("ipc") == "host" or "shm_size" in gpu
    assert "NPROC_PER_NODE:-gpu" in gpu["environment"]["NPROC_PER_NODE"]
    assert cpu["environment"]["DEVICE"] == "cpu"
    for trainer in (gpu, cpu):
        assert trainer["expose"] == ["9200"]
        assert trainer["environment"]["TRAINER_METRICS_PORT"] == "9200"
        assert "checkpoints:/runs" in trainer["volumes"]


def test_monitoring_services(compose):
    services = compose["services"]
    exporter = services["redis-exporter"]
    assert exporter["image"].startswith("oliver006/redis_exporter:")
    assert f"--check-single-streams={STREAMS}" in exporter["command"]
    assert "REDIS_PASSWORD" in exporter["environment"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    grafana = services["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert {"checkpoints", "corpus-cache"} <= set(compose["volumes"])
    # Podman without systemd never runs healthchecks: nothing may wait for one.
    for name, service in services.items():
        depends = service.get("depends_on", [])
        if isinstance(depends, dict):
            for condition in depends.values():
                assert condition.get("condition") != "service_healthy", name


def test_dockerfiles_are_non_root_with_base_and_wheel_arguments():
    for name in ("producer", "trainer"):
        text = (REPO / f"deploy/docker/{name}.Dockerfile").read_text()
        assert re.search(r"^ARG BASE_IMAGE=", text, re.M), name
        assert re.search(r"^ARG WHEEL_DIR=", text, re.M), name
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users, name
        assert users[-1] not in ("root", "0"), name
    producer = (REPO / "deploy/docker/producer.Dockerfile").read_text()
    assert "torch" not in re.sub(r"#.*", "", producer)


def test_dockerignore_keeps_the_context_small_but_the_wheels_in():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".git", ".venv", "runs", "build"):
        assert needed in patterns, needed
    assert not any(p.startswith("deploy") for p in patterns)


# ------------------------------------------------------------------ the stack on podman


def _say(pytestconfig, message: str) -> None:
    """A progress line on the terminal, even under output capture."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"[containers] {message}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], env: dict[str, str], log: Path, timeout: float) -> float:
    """Run a command with its output appended to ``log``; fail with its tail. Returns seconds."""
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run(
            args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{tail}")
    return time.monotonic() - started


def _containers_conf(path: Path) -> Path:
    """deploy/docker/podman/containers.conf, its ulimits lowered to this host's hard limits
    where those are lower (runc cannot raise them)."""
    text = (REPO / "deploy/docker/podman/containers.conf").read_text()
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(limit)[1]
        if hard != resource.RLIM_INFINITY:
            text = re.sub(
                rf"{name}=(\d+):(\d+)",
                lambda m, h=hard, n=name: f"{n}={min(int(m[1]), h)}:{min(int(m[2]), h)}",
                text,
            )
    path.write_text(text)
    return path


def _torch_cpu_wheel() -> Path | None:
    """The torch CPU wheel in pip's find-links directories (pip config, PIP_FIND_LINKS)."""
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        for line in listing.splitlines():
            key, _, value = line.partition("=")
            if key.endswith("find-links"):
                dirs += value.strip("'\"").split()
    for directory in dirs:
        directory = directory.removeprefix("file://")
        wheels = sorted(Path(directory).glob("torch-*+cpu-*.whl")) if directory else []
        if wheels:
            return wheels[-1]
    return None


def _corpus(tmp: Path) -> Path:
    for candidate in (
        REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
        Path("~/.cache/maskstream/tinyshakespeare.txt").expanduser(),
    ):
        if candidate.is_file():
            return candidate
    path = tmp / "corpus.txt"  # offline and no copy around: any text will do
    path.write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(5000))
    )
    return path


class Stack:
    """The compose project on podman: podman-compose with this test's files and env."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        compose = Path(sys.executable).with_name("podman-compose")
        self.compose = [
            str(compose) if compose.exists() else "podman-compose",
            "-p",
            PROJECT,
            *(arg for name in COMPOSE_FILES for arg in ("-f", name)),
            "--profile",
            "cpu",
            "--podman-build-args=--network=host",
        ]

    def __call__(self, *args: str, timeout: float = 600) -> float:
        return _run([*self.compose, *args], self.env, self.log, timeout)

    def podman(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode:
            pytest.fail(f"podman {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def containers(self, service: str | None = None) -> list[str]:
        args = ["ps", "-a", "--format", "{{.Names}}"]
        args += ["--filter", f"label=io.podman.compose.project={PROJECT}"]
        if service:
            args += ["--filter", f"label=io.podman.compose.service={service}"]
        return sorted(self.podman(*args).split())

    def logs(self) -> str:
        parts = []
        for name in self.containers():
            out = subprocess.run(
                ["podman", "logs", "--tail", "15", name],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            parts.append(f"--- {name}\n{out.stdout}{out.stderr}")
        return "\n".join(parts)

    def remove(self) -> None:
        """Everything of the project, scaled replicas included (podman-compose's down only
        knows the file's replica count). Producers and trainers stop first, while Redis is
        still there to finish their sends and acks."""
        for service in ("producer", "trainer-cpu"):
            names = self.containers(service)
            if names:
                self.podman("stop", "-t", "60", *names, check=False)
        with contextlib.suppress(Exception):
            self("down", "-v", "--remove-orphans", "-t", "20", timeout=300)
        left = self.containers()
        if left:
            self.podman("rm", "-f", "-t", "5", *left, check=False)
            with contextlib.suppress(Exception):
                self("down", "-v", "--remove-orphans", timeout=300)
        for kind in ("volume", "network"):
            names = self.podman(
                kind, "ls", "-q", "--filter", f"label=io.podman.compose.project={PROJECT}"
            )
            if names.split():
                self.podman(kind, "rm", "-f", *names.split(), check=False)


def require_container_tools() -> None:
    """Fail, with what to install, where the container tests cannot run."""
    if os.geteuid() != 0:
        pytest.fail("the container test runs as root (debootstrap, rootful podman)")
    missing = [tool for tool in ("podman", "runc", "debootstrap") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"missing {missing}: apt-get install podman runc debootstrap (see .ci/run)")


def stack_env(tmp: Path, producers: int, **extra: str) -> dict[str, str]:
    """The environment of a compose run under test: private ports, a fresh Redis
    password, the local Debian base, the corpus file, ``producers`` replicas."""
    env = dict(os.environ)
    env.update(
        CONTAINERS_CONF=str(_containers_conf(tmp / "containers.conf")),
        REDIS_PASSWORD=secrets.token_hex(16),
        CORPUS_FILE=str(_corpus(tmp)),
        DEBIAN_BASE_IMAGE=BASE_IMAGE,
        PRESET="tiny",
        PRODUCER_REPLICAS=str(producers),
        BIND_ADDRESS="127.0.0.1",
        PROMETHEUS_PORT=str(_free_port()),
        REDIS_PORT=str(_free_port()),
        GRAFANA_PORT=str(_free_port()),
        **extra,
    )
    env.pop("COMPOSE_PROFILES", None)
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pytestconfig) -> Iterator[Stack]:
    require_container_tools()
    tmp = tmp_path_factory.mktemp("containers")
    log = tmp / "podman.log"
    env = stack_env(tmp, producers=2)
    stack = Stack(env, log)
    _say(pytestconfig, f"log: {log}")

    seconds = _run(["deploy/docker/debian-base.sh", BASE_IMAGE], env, log, timeout=900)
    _say(pytestconfig, f"Debian base image {BASE_IMAGE}: {seconds:.0f} s")
    wheel = _torch_cpu_wheel()
    if wheel is not None:
        wheels = REPO / "deploy/docker/wheels"
        if not (wheels / wheel.name).exists():
            shutil.copy2(wheel, wheels / wheel.name)
        env["TORCH_CPU_INDEX_URL"] = ""  # the wheel dir has it: no other index needed
        _say(pytestconfig, f"torch CPU wheel: {wheel.name}")

    stack.remove()  # leftovers of an interrupted run
    for service in ("redis", "producer", "trainer-cpu"):
        seconds = stack("build", service, timeout=1200)
        _say(pytestconfig, f"built {service}'s image: {seconds:.0f} s")
    try:
        yield stack
    finally:
        started = time.monotonic()
        stack.remove()
        # Images replaced by this run's builds (the current ones stay, as build cache).
        stack.podman("image", "prune", "-f", "--filter", "label=maskstream.image", check=False)
        _say(pytestconfig, f"torn down: {time.monotonic() - started:.0f} s")
        assert not stack.containers(), "containers left behind"


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def _get(self, path: str, **params: str) -> dict:
        url = f"{self.base}/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)["data"]
        except (OSError, ValueError):
            return {}

    def targets(self, job: str) -> dict[str, str]:
        """instance -> health of the job's active targets."""
        return {
            t["labels"]["instance"]: t["health"]
            for t in self._get("targets", state="active").get("activeTargets", [])
            if t["labels"].get("job") == job
        }

    def value(self, query: str) -> float | None:
        result = self._get("query", query=query).get("result", [])
        return float(result[0]["value"][1]) if result else None


def _wait(condition: Callable[[], object], timeout: float, what: str, stack: Stack):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{stack.logs()}")
        time.sleep(2)


@stack_test
@pytest.mark.slow
def test_stack_scales_producers_and_trains(stack: Stack, pytestconfig):
    prom = Prometheus(int(stack.env["PROMETHEUS_PORT"]))
    started = time.monotonic()
    stack("up", "-d")
    assert len(stack.containers("producer")) == 2
    assert not stack.containers("grafana")

    def producers_up(n: int) -> Callable[[], dict[str, str] | None]:
        def check() -> dict[str, str] | None:
            targets = prom.targets("producer")
            ok = len(targets) == n and set(targets.values()) == {"up"}
            return targets if ok else None

        return check

    targets = _wait(producers_up(2), 180, "2 producer targets up in Prometheus", stack)
    _say(pytestconfig, f"2 producers scraped: {sorted(targets)}")
    _wait(lambda: set(prom.targets("trainer").values()) == {"up"}, 180, "the trainer up", stack)
    _wait(
        lambda: prom.value('redis_stream_length{stream="maskstream:train"}') is not None,
        120,
        "the exporter's maskstream:train length",
        stack,
    )

    consumed = "sum(maskstream_consumed_batches_total)"
    first = _wait(lambda: prom.value(consumed), 240, "consumed batches", stack)
    second = _wait(
        lambda: (v := prom.value(consumed)) is not None and v > first and v,
        120,
        f"{consumed} above {first}",
        stack,
    )
    _say(pytestconfig, f"trainer consumed {first:.0f} -> {second:.0f} batches")

    stack("up", "-d", "--scale", "producer=3")
    assert len(stack.containers("producer")) == 3
    targets = _wait(producers_up(3), 180, "3 producer targets up in Prometheus", stack)
    up = prom.value('sum(up{job="producer"})')
    elapsed = time.monotonic() - started
    _say(pytestconfig, f"3 producers scraped: {sorted(targets)}; up sums to {up}; {elapsed:.0f} s")
    assert up == 3

    # The services run as non-root users, and Redis answers no one without the password.
    for service in ("producer", "trainer-cpu", "redis"):
        name = stack.containers(service)[0]
        assert stack.podman("exec", name, "id", "-u").strip() != "0", service
    redis = stack.containers("redis")[0]
    assert "NOAUTH" in stack.podman("exec", redis, "redis-cli", "ping")
    auth = f"REDISCLI_AUTH={stack.env['REDIS_PASSWORD']}"
    authed = stack.podman("exec", "-e", auth, redis, "redis-cli", "ping")
    assert authed.strip() == "PONG"


# Every tag that a wheel for Linux x86_64 with glibc 2.28 may carry (pip's --platform takes
# exact tags: it does not widen manylinux_2_28 to the older ones).
LINUX_TAGS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


@stack_test
@pytest.mark.slow
def test_cuda_trainer_requirement_resolves(tmp_path, pytestconfig):
    """The CUDA trainer image's torch, as its Dockerfile asks for it, resolves on PyPI for
    Linux x86_64 / CPython 3.11 to a CUDA build (metadata only: nothing is downloaded but
    the packages' metadata)."""
    dockerfile = (REPO / "deploy/docker/trainer.Dockerfile").read_text()
    spec = re.search(r"^ARG TORCH_SPEC=(\S+)", dockerfile, re.M)[1]
    platforms = [arg for tag in LINUX_TAGS for arg in ("--platform", tag)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    report = tmp_path / "report.json"
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--quiet",
            "--ignore-installed", "--only-binary=:all:", *platforms, "--python-version", "3.11",
            "--implementation", "cp", "--target", str(tmp_path / "target"),
            "--report", str(report), spec,
        ],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    installs = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert installs["torch"] == spec.split("==")[1]
    cuda = sorted(name for name in installs if name.startswith("nvidia-"))
    assert any(name.startswith("nvidia-cuda-runtime") for name in cuda), installs
    assert any(name.startswith("nvidia-nccl") for name in cuda), installs
    _say(
        pytestconfig,
        f"CUDA trainer: {spec} resolves with {len(cuda)} nvidia-* wheels "
        f"({time.monotonic() - started:.0f} s)",
    )
