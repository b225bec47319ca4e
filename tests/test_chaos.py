"""The chaos suite (``make test-chaos``): real redis-server processes, real
producers and a real 2-rank torchrun trainer under faults. Every scenario
ends with exact per-(producer, seq) accounting (produced = acked once +
dead-lettered + still queued, plus, after a restart without persistence,
exactly the entries that were waiting in the lost stream) and with the
trainer exiting 0."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest

from shared.redis_server import RedisServer
from tests.accounting import KEYS, acked_entries, close_accounts, in_stream
from tests.helpers import REPO, SMALL_RECIPE, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

SMALL = [*SMALL_RECIPE, "--log_interval=5", "--eval_interval=1000"]


class Trainer:
    """``python -m services.trainer.launch`` (torchrun, 2 gloo ranks) as a
    process group of its own, logging to a file."""

    started: ClassVar[list[Trainer]] = []  # killed after each test, whatever happened

    def __init__(self, args: list[str], log: Path, world: int = 2) -> None:
        Trainer.started.append(self)
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.trainer.launch", f"--nproc_per_node={world}", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text()

    def reached(self, iteration: int, of: int) -> bool:
        return f"iter {iteration}/{of}:" in self.text()

    def signal_all(self, signum: int) -> None:
        """Every process of the launch: launcher, torchrun and the ranks."""
        os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self._out.close()
        return code


@pytest.fixture(autouse=True)
def no_trainer_outlives_its_test():
    yield
    while Trainer.started:
        trainer = Trainer.started.pop()
        if trainer.proc.poll() is None:
            # The whole group: a rank whose torchrun died would wait for Redis forever.
            with contextlib.suppress(ProcessLookupError):
                trainer.signal_all(signal.SIGKILL)
            trainer.wait(30)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(trainer.proc.pid, signal.SIGKILL)
        trainer._out.close()


def progress(trainer: Trainer, iteration: int, of: int, timeout: float = 120) -> None:
    wait_until(lambda: trainer.reached(iteration, of), timeout, f"iteration {iteration}", 0.1)


def trainer_args(redis: RedisServer, tmp_path: Path, iters: int, *extra: str) -> list[str]:
    return [
        f"--redis_url={redis.url}",
        *SMALL,
        f"--max_iters={iters}",
        f"--out_dir={tmp_path / 'run'}",
        f"--ack_log={tmp_path / 'acks' / 'log'}",
        *extra,
    ]


def producers(start_producer, redis: RedisServer, corpus: Path, n: int, *extra: str) -> list:
    args = [f"--redis_url={redis.url}", f"--corpus_path={corpus}", *SMALL, "--metrics_port=0"]
    return [start_producer(*args, "--max_backlog=64", *extra) for _ in range(n)]


def finish(trainer: Trainer, procs: list) -> None:
    code = trainer.wait()
    assert code == 0, trainer.text()[-4000:]
    assert [p.terminate() for p in procs] == [0] * len(procs), [p.output()[-2000:] for p in procs]


@pytest.fixture
def redis_aof(tmp_path):
    server = RedisServer(
        workdir=tmp_path / "redis",
        extra_args=["--appendonly", "yes", "--appendfsync", "always"],
    ).start()
    yield server
    server.stop()


@pytest.fixture
def redis_plain(tmp_path):
    server = RedisServer(workdir=tmp_path / "redis").start()
    yield server
    server.stop()


def test_producers_killed_again_and_again(redis_plain, shakespeare, start_producer, tmp_path):
    fleet = producers(start_producer, redis_plain, shakespeare, 3)
    trainer = Trainer(trainer_args(redis_plain, tmp_path, 120), tmp_path / "trainer.log")
    client = redis_plain.client()
    rng = random.Random(7)
    for kill in range(5):
        progress(trainer, 10 + 20 * kill, 120)
        victim = fleet.pop(rng.randrange(len(fleet)))
        victim.kill()
        fleet += producers(start_producer, redis_plain, shakespeare, 1)
        # Each replacement takes a new id (whether it gets room in a full queue before the
        # trainer is done is up to timing).
        wait_until(
            lambda n=4 + kill: int(client.get(KEYS.producer_counter) or 0) >= n,
            60,
            "the replacement producer's id",
        )
    finish(trainer, fleet)
    accounts = close_accounts(client, acked_entries(tmp_path / "acks" / "log"))
    assert accounts["acked"] == 120 * 2
    assert int(client.get(KEYS.producer_counter)) == 8  # 3 + 5 replacements, ids never reused
    assert len(client.hgetall(KEYS.produced)) >= 3


@pytest.mark.parametrize("ack_policy", ["step", "checkpoint"])
def test_trainer_killed_and_resumed(redis_plain, shakespeare, start_producer, tmp_path, ack_policy):
    fleet = producers(start_producer, redis_plain, shakespeare, 2)
    args = trainer_args(
        redis_plain, tmp_path, 60, f"--ack_policy={ack_policy}", "--checkpoint_interval=10"
    )
    first = Trainer(args, tmp_path / "first.log")
    progress(first, 25, 60)
    first.signal_all(signal.SIGKILL)
    assert first.wait() != 0
    resumed = Trainer([*args, "--init_from=resume"], tmp_path / "resumed.log")
    finish(resumed, fleet)
    assert "entries reclaimed" in resumed.text()
    close_accounts(redis_plain.client(), acked_entries(tmp_path / "acks" / "log"))


def test_redis_killed_and_restarted_from_its_aof(redis_aof, shakespeare, start_producer, tmp_path):
    fleet = producers(start_producer, redis_aof, shakespeare, 2)
    trainer = Trainer(trainer_args(redis_aof, tmp_path, 80), tmp_path / "trainer.log")
    progress(trainer, 20, 80)
    redis_aof.kill()
    time.sleep(2)
    redis_aof.start()  # same port and folder: it replays the AOF
    progress(trainer, 40, 80)
    finish(trainer, fleet)
    assert "Redis answers again" in trainer.text()
    close_accounts(redis_aof.client(), acked_entries(tmp_path / "acks" / "log"))


def test_redis_restarted_empty(redis_plain, shakespeare, start_producer, tmp_path):
    """Without persistence the backlog at the crash is lost by definition: the
    test freezes every client, notes what was waiting in the stream, restarts
    Redis empty, and checks that exactly those entries (less any a rank had
    already read and then trained on) are missing, and nothing else."""
    fleet = producers(start_producer, redis_plain, shakespeare, 2)
    trainer = Trainer(trainer_args(redis_plain, tmp_path, 80), tmp_path / "trainer.log")
    progress(trainer, 20, 80)
    for proc in fleet:
        proc.proc.send_signal(signal.SIGSTOP)
    trainer.signal_all(signal.SIGSTOP)
    client = redis_plain.client()
    at_crash = set(in_stream(client))
    redis_plain.restart()  # SIGKILL, then an empty server on the same port
    for proc in fleet:
        proc.proc.send_signal(signal.SIGCONT)
    trainer.signal_all(signal.SIGCONT)
    finish(trainer, fleet)
    assert "re-created it" in trainer.text()
    acked = acked_entries(tmp_path / "acks" / "log")
    lost = at_crash - set(acked)
    assert lost, "nothing was waiting in the stream at the crash"
    accounts = close_accounts(client, acked, lost=lost)
    assert accounts["lost"] <= 64 * 2


def test_redis_frozen_for_20_seconds(redis_plain, shakespeare, start_producer, tmp_path):
    fleet = producers(start_producer, redis_plain, shakespeare, 2)
    trainer = Trainer(trainer_args(redis_plain, tmp_path, 60), tmp_path / "trainer.log")
    progress(trainer, 15, 60)
    redis_plain.proc.send_signal(signal.SIGSTOP)
    time.sleep(20)
    redis_plain.proc.send_signal(signal.SIGCONT)
    finish(trainer, fleet)
    close_accounts(redis_plain.client(), acked_entries(tmp_path / "acks" / "log"))


def test_redis_at_maxmemory(redis_plain, shakespeare, start_producer, tmp_path):
    """Producers that may fill Redis far beyond memory: they back off on its
    refusals, the trainer's acks free memory, a producer started while Redis
    is full waits instead of crashing, and everything goes on by itself.
    (The trainer joins first: a Redis that filled up before any trainer
    created its group cannot take the group; size maxmemory for max_backlog.)"""
    client = redis_plain.client()
    fleet = producers(start_producer, redis_plain, shakespeare, 2, "--max_backlog=100000")
    trainer = Trainer(trainer_args(redis_plain, tmp_path, 100), tmp_path / "trainer.log")
    progress(trainer, 5, 100)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 300_000)
    wait_until(
        lambda: any("Redis is full" in p.output() for p in fleet), 60, "Redis to fill up", 0.2
    )
    fleet += producers(start_producer, redis_plain, shakespeare, 1, "--max_backlog=100000")
    finish(trainer, fleet)
    assert sum("Redis has room again" in p.output() for p in fleet) >= 1
    close_accounts(client, acked_entries(tmp_path / "acks" / "log"))


def test_sigterm_stops_a_starving_trainer(redis_plain, shakespeare, start_producer, tmp_path):
    """Ranks waiting for data still see SIGTERM: they stop within seconds,
    checkpoint, and the documented launch exits 0."""
    (producer,) = producers(start_producer, redis_plain, shakespeare, 1, "--max_backlog=8")
    client = redis_plain.client()
    wait_until(lambda: client.xlen(KEYS.train) >= 8, 60, "a full backlog")
    assert producer.terminate() == 0
    args = trainer_args(redis_plain, tmp_path, 1000, "--prefetch_batches=1", "--log_interval=1")
    trainer = Trainer(args, tmp_path / "trainer.log")
    # 8 entries feed 4 steps of 2 ranks; then both ranks starve.
    progress(trainer, 4, 1000)
    time.sleep(2)
    started = time.monotonic()
    trainer.proc.send_signal(signal.SIGTERM)
    code = trainer.wait(timeout=60)
    assert code == 0, trainer.text()[-4000:]
    assert time.monotonic() - started < 15
    assert "checkpoint at iter 4" in trainer.text()
    assert (tmp_path / "run" / "ckpt.pt").is_file()
    assert client.xlen(KEYS.train) == 0  # the last step's entries acked at the checkpoint
    close_accounts(client, acked_entries(tmp_path / "acks" / "log"))
