"""`make bench-gpu` on the CPU with a toy model: the same processes (private Redis,
producers, the torchrun launcher) and the same summary as on a GPU, the figures
parsed from the trainer's own log lines, the ELBO read from the checkpoint, and
a producer that ignores SIGTERM killed with its stacks printed."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest

from benchmarks import bench_gpu
from tests.helpers import REPO

TOY = ["--nproc=1", "--device=cpu", "--compile=false", "--dtype=float32", "--n_layer=1",
       "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--steps=40",
       "--log_interval=5", "--eval_interval=20", "--elbo_nodes=2", "--producers=2",
       "--torch_threads=1", "--skip_windows=2"]  # fmt: skip


@pytest.mark.slow
def test_trains_under_torchrun_and_reports_speed_and_the_elbo(shakespeare, tmp_path):
    args = [*TOY, f"--corpus_path={shakespeare}", f"--json={tmp_path / 'gpu.json'}"]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", *args],
        cwd=REPO,
        env={**bench_gpu.child_env(), "BENCH_GPU_DIR": str(tmp_path / "bench")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "producers with [0, 0]" in out.stdout
    # 40 steps logged every 5: 8 windows, the first 2 left out.
    steady = re.search(r"steady state \(median of (\d+) log windows from iter (\d+)\)", out.stdout)
    assert steady and steady.groups() == ("6", "15"), out.stdout[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["iters"] == 40 and result["tokens"] == 40 * 4 * 64
    assert result["windows"] == 6 and result["tokens_per_s"] > 0 and result["mfu_pct"] is None
    assert 0 <= result["data_wait_pct"] <= result["max_data_wait_pct"] <= 100
    final = result["eval"]
    # The last evaluation is the final one, on every validation window; 40 steps from a
    # random init leave the ELBO below ln(vocab) but not far.
    assert final["iter"] == 40 and final["bound"] == "elbo"
    assert 2.0 < final["nats_per_char"] <= math.log(66) + 0.1
    assert final["bits_per_char"] == pytest.approx(final["nats_per_char"] / math.log(2))
    assert f"ELBO after 40 steps: {final['bits_per_char']:.4f} bits/char" in out.stdout


def test_without_a_gpu_it_says_how_to_get_one_or_run_on_the_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--steps=10"],
        cwd=REPO,
        # No GPU visible, also on a machine that has one.
        env={**bench_gpu.child_env(), "BENCH_GPU_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "sees no GPU" in out.stderr and "--device=cpu" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing started


def test_producers_that_cannot_start_stop_the_run_with_their_reason(tmp_path):
    # The trainer alone would wait for data for ever; the benchmark stops it instead.
    missing = tmp_path / "no-such-corpus.txt"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", *TOY, f"--corpus_path={missing}"],
        cwd=REPO,
        env={**bench_gpu.child_env(), "BENCH_GPU_DIR": str(tmp_path / "bench")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert re.search(r"producer \d exited, stopping the trainer", out.stdout), out.stdout[-2000:]
    assert f"corpus_path {missing} does not exist" in out.stdout


def test_steady_state_leaves_out_the_first_windows():
    line = (
        "INFO trainer[rank0] services.trainer.train: [ 10%] iter {i}/100: loss 2.5000, "
        "lr 1.00e-04, {ms} ms/step, {tok} tokens/s, data wait {wait}%, mfu {mfu}%, stage all"
    )
    log = "\n".join(
        [
            line.format(i=10, ms=2600.0, tok=6000, wait=0.0, mfu=0.1),  # compilation
            "iter 10: val loss 2.9 (ignored: no window)",
            *(line.format(i=i, ms=16.0, tok=1000000, wait=0.1, mfu=20.0) for i in (20, 30)),
            line.format(i=40, ms=100.0, tok=160000, wait=0.0, mfu=3.0),  # after an evaluation
        ]
    )
    speed = bench_gpu.steady_state(log, skip=1)
    assert speed["windows"] == 3 and speed["from_iter"] == 20
    assert speed["ms_per_step"] == 16.0 and speed["tokens_per_s"] == 1000000
    assert speed["mfu_pct"] == 20.0 and speed["max_data_wait_pct"] == 0.1
    assert bench_gpu.steady_state("no log lines", skip=3) == {"windows": 0}


def test_a_producer_that_ignores_sigterm_is_killed_with_its_stacks(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gpu, "OUT", tmp_path)
    stubborn = (
        "import logging, signal, time\n"
        "from shared.lifecycle import stop_on_signals\n"
        "stop_on_signals(logging.getLogger(), 'stopping')\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "producer0.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", stubborn],
            cwd=REPO,
            env=bench_gpu.child_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while "ready" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    assert bench_gpu.stop_producers([proc], grace_s=0.5) == ["killed"]
    assert proc.returncode == -signal.SIGKILL
    # SIGUSR1 made it print where it waited: the sleep on the script's last line.
    assert 'File "<string>", line 6' in log.read_text()
