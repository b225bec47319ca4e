"""The local stack (`make demo`) end to end, as a user runs it."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import redis

from tests.helpers import REPO


@pytest.mark.slow
def test_local_stack_trains_samples_and_stops_cleanly(shakespeare, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.local",
            "--preset=tiny",
            f"--corpus_path={shakespeare}",
            "--batch_size=8",
            "--block_size=64",
            "--n_layer=2",
            "--n_head=2",
            "--n_embd=64",
            "--max_iters=40",
            "--eval_interval=20",
            "--val_batches=4",
            "--eval_iters=4",
            "--log_interval=10",
            f"--out_dir={tmp_path / 'run'}",
            "--torch_threads=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "trainer exited with 0, producers with [0, 0]; redis stopped" in out
    sample = re.search(
        r"-- sample: prompt 0 \+ (\d+) generated characters \((\d+) steps, random order\) --\n"
        r"(.*?)\n--\n",
        out,
        re.S,
    )
    # The whole window, line breaks included.
    assert sample and int(sample.group(1)) == 64 and int(sample.group(2)) == 128
    assert len(sample.group(3)) == 64, sample.group(3)
    loss = re.search(r"^val loss (\d+\.\d{4})$", out, re.M)
    assert loss and float(loss.group(1)) < math.log(66)  # better than guessing uniformly
    # The last line is the likelihood bound, comparable with an AR model's NLL.
    last = out.strip().splitlines()[-1]
    bound = re.fullmatch(r"val ELBO (\d+\.\d{4}) bits/char \(.* \d+ validation windows\)", last)
    assert bound and float(bound.group(1)) < math.log2(66), last


def test_a_producer_that_cannot_start_ends_the_run_with_its_code(tmp_path):
    # A typo in the corpus path: the producers exit 2 at once; the trainer would wait for
    # data for ever. A checkpoint left by an earlier run must not be reported as this one's.
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "ckpt.pt").write_bytes(b"an earlier run's checkpoint")
    run = subprocess.run(
        [sys.executable, "-m", "services.local", "--preset=tiny",
         f"--corpus_path={tmp_path / 'no-such-corpus.txt'}", f"--out_dir={out_dir}",
         "--init_from=scratch"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(
        r"producer \d exited with 2 \(its error is above\): ending the run", run.stdout
    )
    assert "no-such-corpus.txt does not exist" in run.stderr
    assert "sample" not in run.stdout and "val loss" not in run.stdout


def test_the_report_takes_only_a_checkpoint_this_run_wrote(tmp_path, capsys):
    from services.local.__main__ import report
    from shared.exit_codes import ExitCode
    from shared.settings import load_settings

    settings = load_settings(["--preset=tiny", f"--out_dir={tmp_path}"], env={})
    (tmp_path / "ckpt.pt").write_bytes(b"older than this run")
    os.utime(tmp_path / "ckpt.pt", (1_000_000_000, 1_000_000_000))
    assert report(settings, since=time.time(), stopped_early=False) == ExitCode.FAILURE
    assert "this run wrote no checkpoint" in capsys.readouterr().out
    # Asked to stop (Ctrl-C, local_seconds) before any checkpoint: said, and not a failure.
    assert report(settings, since=time.time(), stopped_early=True) == ExitCode.OK
    assert "this run wrote no checkpoint" in capsys.readouterr().out


def start_toy_stack(shakespeare, tmp_path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.local", "--preset=tiny", f"--corpus_path={shakespeare}",
         "--batch_size=8", "--block_size=64", "--n_layer=1", "--n_head=2", "--n_embd=32",
         "--eval_interval=200", "--val_batches=4", "--eval_iters=4", "--log_interval=10",
         "--torch_threads=1", f"--out_dir={tmp_path / 'run'}", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def run_and_strike(proc: subprocess.Popen, when: str, strike) -> str:
    """The stack's whole output; at its first line matching ``when``, ``strike``
    (given the lines so far) does its harm, and the stack runs on to its end."""
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(when, line):
                strike(lines)
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return "".join(lines) + rest


@pytest.mark.slow
def test_ctrl_c_before_the_first_evaluation_exits_0(shakespeare, tmp_path):
    proc = start_toy_stack(shakespeare, tmp_path, "--max_iters=100000")
    out = run_and_strike(proc, r"iter 10/", lambda _: proc.send_signal(signal.SIGINT))
    assert proc.returncode == 0, out[-3000:]
    assert "trainer exited with 0" in out
    assert "the run stopped before its first evaluation" in out


def child_running(parent: int, module: str) -> psutil.Process:
    """The child of ``parent`` running ``python -m module``."""
    for child in psutil.Process(parent).children():
        if child.cmdline()[1:3] == ["-m", module]:
            return child
    raise AssertionError(f"no {module} under {parent}")


@pytest.mark.slow
def test_killed_producer_and_trainer_are_started_again_and_training_finishes(shakespeare, tmp_path):
    proc = start_toy_stack(shakespeare, tmp_path, "--max_iters=600", "--checkpoint_interval=100")

    def kill_producer_and_trainer(_lines: list[str]) -> None:
        victims = [child_running(proc.pid, f"services.{m}") for m in ("producer", "trainer")]
        for victim in victims:
            victim.kill()

    # Past a checkpoint (every 100 steps): kill -9 both.
    out = run_and_strike(proc, r"iter 1[5-9]0/600", kill_producer_and_trainer)
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"producer \d exited with -9: starting it again", out)
    assert "trainer exited with -9: starting it again, from its checkpoint" in out
    resumed = re.search(r"resumed from \S+ at iter (\d+)", out)
    assert resumed and int(resumed.group(1)) in (100, 200), out[-3000:]
    assert "iter 600/600" in out and "trainer exited with 0, producers with [0, 0]" in out
    assert re.search(r"^val ELBO \d+\.\d{4} bits/char", out.strip().splitlines()[-1])


@pytest.mark.slow
def test_redis_killed_mid_run_is_started_again_and_training_finishes(shakespeare, tmp_path):
    proc = start_toy_stack(shakespeare, tmp_path, "--max_iters=400")

    def kill_redis(lines: list[str]) -> None:
        port = re.search(r"\[local\] redis \S+ on port (\d+)", "".join(lines)).group(1)
        os.kill(redis.Redis(port=int(port)).info("server")["process_id"], signal.SIGKILL)

    out = run_and_strike(proc, r"iter (2|3)0/400", kill_redis)  # while training
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"redis-server exited with -9: starting it again, empty, on port", out)
    assert "iter 400/400" in out and "trainer exited with 0, producers with [0, 0]" in out
    assert re.search(r"^val ELBO \d+\.\d{4} bits/char", out.strip().splitlines()[-1])


@pytest.mark.slow
def test_killing_the_stack_outright_stops_everything_it_started(shakespeare, tmp_path):
    proc = start_toy_stack(shakespeare, tmp_path, "--max_iters=100000")
    try:
        for line in proc.stdout:
            if re.search(r"iter \d+0/100000", line):  # training
                break
        children = psutil.Process(proc.pid).children()
        assert len(children) == 4  # redis-server, two producers, the trainer
        killed_at = time.time()
        proc.kill()  # kill -9: no chance to stop anything itself
        proc.wait()
        _gone, alive = psutil.wait_procs(children, timeout=60)
    finally:
        proc.kill()
    assert not alive, [p.cmdline() for p in alive]
    # The trainer was asked to stop, not killed: it checkpointed on the way out.
    assert (tmp_path / "run" / "ckpt.pt").stat().st_mtime >= killed_at
