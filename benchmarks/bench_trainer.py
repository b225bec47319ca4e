"""Trainer benchmark: the same model and training step fed from the Redis stream
(with producers keeping up) and from micro-batches already in memory, in the
same process and run, alternating, so the ratio compares like with like.

Run from the repository root::

    python -m benchmarks.bench_trainer                       # tiny preset, CPU
    python -m benchmarks.bench_trainer --preset=char_diffusion --device=cuda

Any ``--key=value`` is a setting (see ``python -m services.producer --help``);
``--bench_steps=N`` and ``--bench_rounds=N`` size the measurement.
"""

from __future__ import annotations

import contextlib
import math
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see services/trainer/__main__.py

import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from benchmarks import with_defaults
from services.trainer.feed import MicroBatch
from services.trainer.train import Trainer
from shared.lifecycle import child_env
from shared.redis_server import RedisServer
from shared.settings import TrainerConfig, load_settings

TARGET_RATIO, TARGET_WAIT, TARGET_CHECKS = 0.97, 0.02, 0.01


class InMemoryFeed:
    """The feed interface over micro-batches already in host memory."""

    def __init__(self, batches: list[MicroBatch]) -> None:
        self.batches, self.i, self.wait_s = batches, 0, 0.0

    def next(self, stop: threading.Event | None = None) -> MicroBatch:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def ack(self, entry_ids: list[bytes]) -> None:
        pass

    def flush(self) -> None:
        pass


def time_entry_checks(trainer: Trainer, repeats: int = 500) -> float:
    """Seconds of every consumer check (decode, contract, tokens) per entry,
    timed on an entry from the stream."""
    reader = trainer.feed.reader
    _, fields = trainer.client.xrange(reader.stream, count=1)[0]
    started = time.perf_counter()
    for _ in range(repeats):
        reader.validator.check(fields)
    return (time.perf_counter() - started) / repeats


def measure(trainer: Trainer, feed, steps: int) -> tuple[float, float]:
    """(tokens/s, share of step time spent waiting for data) over ``steps``."""
    trainer.feed = feed
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    wait0, started = feed.wait_s, time.perf_counter()
    for _ in range(steps):
        if trainer.train_step() is None:
            sys.exit("bench-trainer: the trainer stopped: a producer exited (see above)")
    trainer._barrier_and_ack()  # this round's last acks sent, on the GPU its last step run
    elapsed = time.perf_counter() - started
    return steps * trainer.tokens_per_step / elapsed, (feed.wait_s - wait0) / elapsed


class TimedFeed:
    """A feed whose ``next`` and ``ack`` calls, made in the step's own thread,
    are timed: the host time the feed takes from the step itself."""

    def __init__(self, feed) -> None:
        self.feed, self.next_s, self.ack_s = feed, 0.0, 0.0

    @property
    def wait_s(self) -> float:
        return self.feed.wait_s

    def next(self, stop: threading.Event | None = None) -> MicroBatch | None:
        started = time.perf_counter()
        try:
            return self.feed.next(stop)
        finally:
            self.next_s += time.perf_counter() - started

    def ack(self, entry_ids: list[bytes]) -> None:
        started = time.perf_counter()
        try:
            self.feed.ack(entry_ids)
        finally:
            self.ack_s += time.perf_counter() - started

    def flush(self) -> None:
        self.feed.flush()


def profile(trainer: Trainer, feed, steps: int) -> dict[str, float]:
    """Per step, in ms: wall time, the time the step's thread spent in the feed's
    ``next`` and ``ack``, and (on a GPU) the time the device was busy with
    kernels: a device busy for much less than the wall time waits for the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    timed = TimedFeed(feed)
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch_profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        measure(trainer, timed, steps)
        wall = time.perf_counter() - started
    # The kernels' own rows only: a CPU op's row repeats its kernels' time, and a
    # user annotation on the GPU spans kernels already counted.
    device_s = (
        sum(
            e.self_device_time_total
            for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation
        )
        / 1e6
        if cuda
        else math.nan
    )
    return {
        "wall": 1e3 * wall / steps,
        "next": 1e3 * timed.next_s / steps,
        "ack": 1e3 * timed.ack_s / steps,
        "device": 1e3 * device_s / steps,
    }


def watch(producers: list[subprocess.Popen], dead: threading.Event) -> None:
    """Set ``dead`` once any producer has exited, for whatever reason."""
    while not dead.is_set():
        if any(proc.poll() is not None for proc in producers):
            dead.set()
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    steps = next((int(a.split("=")[1]) for a in argv if a.startswith("--bench_steps=")), 40)
    rounds = next((int(a.split("=")[1]) for a in argv if a.startswith("--bench_rounds=")), 3)
    profile_steps = next(
        (int(a.split("=")[1]) for a in argv if a.startswith("--bench_profile=")), 0
    )
    argv = [a for a in argv if not a.startswith("--bench_")]
    argv = with_defaults(argv)
    with RedisServer() as server, contextlib.ExitStack() as files:
        args = [*argv, f"--redis_url={server.url}", "--max_iters=1000000", "--log_interval_s=600"]
        logs = [files.enter_context(tempfile.TemporaryFile()) for _ in range(2)]
        producers = [
            subprocess.Popen(
                [sys.executable, "-m", "services.producer", *args], env=child_env(), stderr=log
            )
            for log in logs
        ]
        # A producer that dies (a bad setting, a missing package) stops the wait for its
        # contract instead of leaving the benchmark waiting forever.
        dead = threading.Event()
        threading.Thread(target=watch, args=(producers, dead), daemon=True).start()
        try:
            settings = load_settings(
                [*args, "--out_dir=/tmp/maskstream-bench-trainer"], service=TrainerConfig
            )
            trainer = Trainer.start(settings, dead)
            if trainer is None:
                for proc, log in zip(producers, logs, strict=True):
                    if proc.poll() is not None:
                        log.seek(0)
                        tail = log.read()[-2000:].decode(errors="replace")
                        sys.exit(f"bench-trainer: a producer exited early; its log ends:\n{tail}")
                sys.exit("bench-trainer: the trainer stopped before it started")
            stream_feed = trainer.feed
            stream_feed.start()
            for _ in range(5):  # warm up, and let the read-ahead fill
                trainer.train_step()
            memory = InMemoryFeed([stream_feed.next() for _ in range(16)])
            results: dict[str, list[tuple[float, float]]] = {"stream": [], "memory": []}
            for _ in range(rounds):
                results["stream"].append(measure(trainer, stream_feed, steps))
                results["memory"].append(measure(trainer, memory, steps))
            profiles = (
                {"stream": profile(trainer, stream_feed, profile_steps),
                 "memory": profile(trainer, memory, profile_steps)}
                if profile_steps
                else {}
            )  # fmt: skip
            trainer.feed = stream_feed
            check_s = time_entry_checks(trainer)
            trainer.close()
        finally:
            for proc in producers:
                proc.terminate()
            for proc in producers:
                proc.wait(30)
    device = torch.cuda.get_device_name() if trainer.device.type == "cuda" else "CPU"
    stream_tps = statistics.median(t for t, _ in results["stream"])
    memory_tps = statistics.median(t for t, _ in results["memory"])
    wait = statistics.median(w for _, w in results["stream"])
    ratio = stream_tps / memory_tps
    print(
        f"trainer benchmark on {device} ({torch.get_num_threads()} threads), "
        f"{trainer.raw_model.num_params(False) / 1e6:.2f}M parameters, "
        f"{trainer.tokens_per_step} tokens/step, {rounds} rounds of {steps} steps (median)"
    )
    print(f"{'feed':<28}{'tokens/s':>12}{'data wait':>12}")
    print(f"{'Redis stream, 2 producers':<28}{stream_tps:>12,.0f}{100 * wait:>11.2f}%")
    print(f"{'in-memory micro-batches':<28}{memory_tps:>12,.0f}{0:>11.2f}%")
    print(f"stream / memory: {ratio:.3f}")
    print(
        f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}  throughput ratio {ratio:.3f} "
        f"(target >= {TARGET_RATIO})"
    )
    print(
        f"{'PASS' if wait < TARGET_WAIT else 'FAIL'}  data wait {100 * wait:.2f}% of step time "
        f"(target < {100 * TARGET_WAIT:g}%)"
    )
    # The checks run in the read-ahead thread; their share of a step is what
    # they would cost if they ran in line with it.
    micro_per_step = trainer.tokens_per_step / trainer.tokens_per_micro
    check_share = check_s * micro_per_step * stream_tps / trainer.tokens_per_step
    print(
        f"{'PASS' if check_share < TARGET_CHECKS else 'FAIL'}  entry checks "
        f"{1e6 * check_s:.1f} µs per entry = {100 * check_share:.2f}% of a step "
        f"(target < {100 * TARGET_CHECKS:g}%)"
    )
    if profiles:
        print(
            f"\nper step, ms ({profile_steps} steps under torch.profiler each; device: time its "
            "kernels ran)"
        )
        print(f"{'feed':<28}{'wall':>9}{'next()':>9}{'ack()':>9}{'device':>9}")
        for name, label in (("stream", "Redis stream"), ("memory", "in-memory micro-batches")):
            p = profiles[name]
            print(
                f"{label:<28}{p['wall']:>9.2f}{p['next']:>9.3f}{p['ack']:>9.3f}"
                + (f"{p['device']:>9.2f}" if not math.isnan(p["device"]) else f"{'n/a':>9}")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
