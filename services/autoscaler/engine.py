"""The producer replicas of a compose project, seen and changed through the
Docker SDK: Docker Engine, or Podman's Docker-compatible API (``podman system
service``, reached through ``DOCKER_HOST``).

New replicas are copies of a running one: same image, command, environment,
volumes, secret mounts, labels (so ``docker compose ps`` and Prometheus's DNS
discovery see them like any other), network, with the service name as network
alias, and every hardening setting (:data:`COPIED_HOST_CONFIG`: dropped
capabilities, no-new-privileges, read-only root, tmpfs, memory and process
limits). A copy never has more privileges than the replica it copies.
Replicas are removed highest number first, with a graceful stop: SIGTERM, and
the producer finishes its current send before it exits.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import docker
from docker.models.containers import Container

log = logging.getLogger(__name__)

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"


# HostConfig fields a replica copies from its template, as the Engine API names them
# (POST /containers/create takes what GET /containers/{id}/json gives). Compose v2 passes
# volumes and secrets as Mounts, podman-compose as Binds: both are copied.
COPIED_HOST_CONFIG = (
    "Binds",
    "Mounts",
    "Tmpfs",
    "CapAdd",
    "CapDrop",
    "SecurityOpt",
    "ReadonlyRootfs",
    "Privileged",
    "Memory",
    "MemorySwap",
    "MemoryReservation",
    "NanoCpus",
    "CpuShares",
    "PidsLimit",
    "Ulimits",
    "ShmSize",
    "Init",
    "RestartPolicy",
    "LogConfig",
)


def copied_host_config(host: dict[str, Any]) -> dict[str, Any]:
    """The HostConfig of a copy of a container whose HostConfig is ``host``: the fields
    of COPIED_HOST_CONFIG that are set (an engine reads a missing one as its default)."""
    copied = {key: host[key] for key in COPIED_HOST_CONFIG if host.get(key) not in (None, "", [])}
    if "Ulimits" in copied:
        # Podman's inspect names them RLIMIT_NOFILE, which its own create refuses: the API's
        # names are nofile, nproc, ...
        copied["Ulimits"] = [
            {**limit, "Name": limit["Name"].lower().removeprefix("rlimit_")}
            for limit in copied["Ulimits"]
        ]
    return copied


class EngineError(RuntimeError):
    """No container engine to talk to, or it refused a change."""


def connect_engine() -> docker.DockerClient:
    """The engine named by DOCKER_HOST (or the default socket), checked with a ping."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise EngineError(
            f"no container engine reachable ({exc}). Start Docker, or Podman's API with "
            "`podman system service --time=0 unix:///run/podman/podman.sock` and "
            "`export DOCKER_HOST=unix:///run/podman/podman.sock`"
        ) from None
    return client


def replica_number(container: Container) -> int:
    label = container.labels.get(NUMBER_LABEL)
    if label and label.isdigit():
        return int(label)
    match = re.search(r"[_-](\d+)$", container.name)
    return int(match.group(1)) if match else 0


class Replicas:
    def __init__(
        self, client: docker.DockerClient, project: str, service: str, stop_timeout_s: int
    ) -> None:
        self.client, self.project, self.service = client, project, service
        self.stop_timeout_s = stop_timeout_s

    def running(self) -> list[Container]:
        """Running replicas, lowest number first."""
        found = self.client.containers.list(
            filters={
                "label": [f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={self.service}"],
                "status": "running",
            }
        )
        return sorted(found, key=replica_number)

    def scale_to(self, wanted: int) -> int:
        """Start or stop replicas until ``wanted`` run; returns the change made."""
        running = self.running()
        if wanted > len(running):
            if not running:
                raise EngineError(
                    f"no running {self.service} replica of project {self.project} to copy; "
                    "start one with compose first"
                )
            numbers = {
                replica_number(c)
                for c in self.client.containers.list(
                    all=True,
                    filters={
                        "label": [
                            f"{PROJECT_LABEL}={self.project}",
                            f"{SERVICE_LABEL}={self.service}",
                        ]
                    },
                )
            }
            free = (n for n in range(1, 10_000) if n not in numbers)
            for _ in range(wanted - len(running)):
                self._start_copy(running[0], next(free))
        for container in reversed(running[wanted:]):
            self._stop(container)
        return wanted - len(running)

    def _start_copy(self, template: Container, number: int) -> None:
        config: dict[str, Any] = template.attrs["Config"]
        host: dict[str, Any] = template.attrs["HostConfig"]
        networks: dict[str, Any] = template.attrs["NetworkSettings"]["Networks"]
        api = self.client.api
        labels = {**(config.get("Labels") or {}), NUMBER_LABEL: str(number)}
        name = re.sub(r"\d+$", str(number), template.name)
        if name == template.name:
            name = f"{template.name}-{number}"
        endpoints = {
            network: api.create_endpoint_config(aliases=[self.service]) for network in networks
        }
        created = api.create_container(
            image=config["Image"],
            command=config.get("Cmd"),
            entrypoint=config.get("Entrypoint"),
            environment=config.get("Env"),
            user=config.get("User") or None,
            working_dir=config.get("WorkingDir") or None,
            labels=labels,
            name=name,
            # The Engine API's own field names, passed through (docker-py's host config is a
            # dict of them), so that nothing the template has is lost in a translation.
            host_config=copied_host_config(host),
            networking_config=api.create_networking_config(endpoints) if endpoints else None,
        )
        api.start(created["Id"])
        log.info("started %s (copy of %s)", name, template.name)

    def _stop(self, container: Container) -> None:
        container.stop(timeout=self.stop_timeout_s)
        container.remove()
        log.info("stopped and removed %s", container.name)


def own_project(client: docker.DockerClient) -> str | None:
    """The compose project of the container this process runs in, if any."""
    import socket

    try:
        me = client.containers.get(socket.gethostname())
    except docker.errors.DockerException:
        return None
    return me.labels.get(PROJECT_LABEL)
