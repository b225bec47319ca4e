"""The trainer as real processes (alone and under torchrun with gloo) against
a real redis-server and real producers; accounting checked entry by entry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import psutil
import pytest
import torch

from services.trainer.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    OutDirInUse,
    hold_out_dir,
)
from services.trainer.feed import MicroBatch
from services.trainer.model import MaskedLM, ModelConfig
from services.trainer.train import Dist, Trainer, set_learning_rate, wait_for_contract
from shared.codec import Batch, encode
from shared.redis_server import RedisServer, free_port
from shared.settings import TrainerConfig, load_settings
from shared.streams import PAYLOAD_FIELD, StreamKeys, connect
from tests.accounting import acked_entries, close_accounts
from tests.helpers import REPO, SMALL_RECIPE, wait_until

pytestmark = pytest.mark.slow

KEYS = StreamKeys("maskstream")
CPU = torch.device("cpu")
SMALL = [*SMALL_RECIPE, "--log_interval=5"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def trainer_cmd(world: int, args: list[str]) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "services.trainer", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        "--max-restarts=0",
        "-m",
        "services.trainer",
        *args,
    ]


def run_trainer(world: int, args: list[str], log: Path, timeout: float = 300) -> str:
    with open(log, "w") as out:
        code = subprocess.run(
            trainer_cmd(world, args),
            cwd=REPO,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        ).returncode
    text = log.read_text()
    assert code == 0, text[-3000:]
    return text


def start_two_producers(start_producer, url: str, corpus: Path, extra: list[str] = ()):
    args = [f"--redis_url={url}", f"--corpus_path={corpus}", *SMALL, "--max_backlog=64", *extra]
    return [start_producer(*args) for _ in range(2)]


def test_two_ranks_ack_every_entry_exactly_once(redis7, shakespeare, start_producer, tmp_path):
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    ack_log = tmp_path / "acks"
    out = run_trainer(
        2,
        [
            f"--redis_url={redis7.url}",
            f"--corpus_path={shakespeare}",
            *SMALL,
            "--max_iters=30",
            "--eval_interval=15",
            "--checkpoint_interval=10",
            "--gradient_accumulation_steps=2",
            f"--out_dir={tmp_path / 'run'}",
            f"--ack_log={ack_log}",
            "--peak_flops=1e9",
        ],
        tmp_path / "trainer.log",
    )
    assert [p.terminate() for p in producers] == [0, 0]
    client = redis7.client()
    acked = acked_entries(ack_log)
    accounts = close_accounts(client, acked)
    # 30 steps x 2 ranks x 2 micro-batches, each trained on exactly once.
    assert accounts["acked"] == 120
    assert {p for p, _ in acked} == {0, 1}  # both producers fed the ranks
    assert "val loss" in out and "(0 double)" in out
    ckpt = Checkpoint.load(tmp_path / "run" / "ckpt.pt")
    assert ckpt.iter_num == 30 and ckpt.stream["world"] == 2
    # tokens/s counts both ranks' tokens, so MFU is against both devices' peak.
    flops = MaskedLM(ckpt.model_config).flops_per_token()
    logged = re.findall(r"([\d]+) tokens/s, data wait [\d.]+%, mfu ([\d.]+)%", out)
    assert len(logged) == 6, out[-2000:]
    for tokens_per_s, mfu in logged:
        # Printed to 0.1 points, and tokens/s to the unit: the tolerance is both roundings.
        tolerance = 0.05 + 100 * 0.5 * flops / 2e9 + 1e-9
        assert float(mfu) == pytest.approx(100 * int(tokens_per_s) * flops / 2e9, abs=tolerance)


def run_two_machines(args: list[str], per_node: list[list[str]], tmp_path: Path) -> list[str]:
    """Two launchers as two machines of one run (``--nnodes=2``), one CPU rank each, meeting
    on loopback; ``per_node``: each one's own settings. Their outputs, once both exited; a
    launcher that runs past 240 s fails the test."""
    master = ["--nnodes=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    nodes = []
    for rank, own in enumerate(per_node):
        log = open(tmp_path / f"node{rank}.log", "w")  # noqa: SIM115
        command = [
            sys.executable, "-m", "services.trainer.launch", "--nproc_per_node=1", *master,
            f"--node_rank={rank}", *args, f"--trainer_metrics_port={free_port()}", *own,
        ]  # fmt: skip
        nodes.append((subprocess.Popen(command, cwd=REPO, env=env(), stdout=log, stderr=log), log))
    codes = []
    for proc, log in nodes:
        try:
            codes.append(proc.wait(timeout=240))
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    return [
        f"exit {code}\n" + (tmp_path / f"node{i}.log").read_text() for i, code in enumerate(codes)
    ]


def test_two_machines_train_one_run_and_ack_every_entry_once(
    redis7, shakespeare, start_producer, tmp_path
):
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    ack_log, run = tmp_path / "acks", tmp_path / "run"
    args = [
        f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL, "--max_iters=20",
        "--eval_interval=20", "--checkpoint_interval=10", f"--out_dir={run}",
        f"--ack_log={ack_log}",
    ]  # fmt: skip
    outs = run_two_machines(args, [[], []], tmp_path)
    assert [out.split("\n", 1)[0] for out in outs] == ["exit 0", "exit 0"], outs[0][-3000:]
    assert [p.terminate() for p in producers] == [0, 0]
    accounts = close_accounts(redis7.client(), acked_entries(ack_log))
    assert accounts["acked"] == 40  # 20 steps x 2 ranks, each entry trained on once
    ckpt = Checkpoint.load(run / "ckpt.pt")
    assert ckpt.iter_num == 20 and ckpt.stream["world"] == 2
    assert "val loss" in outs[0]  # the first machine holds rank 0


@pytest.mark.parametrize("second_has", ["a later checkpoint", "no checkpoint", "scratch"])
def test_machines_that_resume_from_different_checkpoints_refuse_together(
    redis7, shakespeare, start_producer, tmp_path, second_has
):
    """Each rank reads out_dir itself: without a shared directory the machines' checkpoints
    differ, and every rank stops before training (none waits for the others): exit 2 for
    another checkpoint or for init_from=scratch on one machine, 3 when a rank has none."""
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    common = [f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL]
    first, second = tmp_path / "first", tmp_path / "second"
    run_trainer(1, [*common, "--max_iters=5", f"--out_dir={first}"], tmp_path / "a.log")
    if second_has == "a later checkpoint":
        run_trainer(1, [*common, "--max_iters=10", f"--out_dir={second}", "--run_name=other"],
                    tmp_path / "b.log")  # fmt: skip
    init = "--init_from=scratch" if second_has == "scratch" else "--init_from=resume"
    outs = run_two_machines(
        [*common, "--max_iters=20", "--run_name=both"],
        [[f"--out_dir={first}", "--init_from=resume"], [f"--out_dir={second}", init]],
        tmp_path,
    )
    assert [p.terminate() for p in producers] == [0, 0]
    said = {
        "a later checkpoint": "different checkpoints in out_dir (iterations 5 to 10",
        "scratch": "some ranks start from scratch and others resume from iteration 5",
    }
    for out in outs:
        assert "Traceback" not in out, out[-3000:]
        if second_has in said:
            assert out.startswith("exit 2\n"), out[-3000:]
            assert said[second_has] in out and "must be one shared directory" in out, out[-3000:]
        else:
            assert out.startswith("exit 3\n"), out[-3000:]
    if second_has == "no checkpoint":
        assert "another rank could not resume" in outs[0], outs[0][-3000:]
        assert f"no checkpoint at {second}" in outs[1], outs[1][-3000:]
    assert Checkpoint.load(first / "ckpt.pt").iter_num == 5


@pytest.mark.parametrize("refusing", ["the second machine", "every machine"])
def test_a_machine_that_refuses_to_start_stops_the_other_machines(
    redis7, shakespeare, start_producer, tmp_path, refusing
):
    """A refusal before the process group (here: a checkpoint a fresh start would replace)
    stops that machine's ranks; the other machines' learn it as soon as all have joined, and
    stop with exit 2 instead of waiting for them, even with no contract published yet (an
    empty namespace)."""
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    common = [f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL]
    earlier = tmp_path / "earlier"
    run_trainer(1, [*common, "--max_iters=5", f"--out_dir={earlier}"], tmp_path / "a.log")
    first = earlier if refusing == "every machine" else tmp_path / "fresh"
    outs = run_two_machines(
        [*common, "--max_iters=20", "--run_name=both", "--namespace=nothing_yet"],
        [[f"--out_dir={first}"], [f"--out_dir={earlier}"]],
        tmp_path,
    )
    assert [p.terminate() for p in producers] == [0, 0]
    assert [out.split("\n", 1)[0] for out in outs] == ["exit 2", "exit 2"], outs[0][-3000:]
    told = "another rank refused to start" if refusing == "the second machine" else "holds the"
    assert told in outs[0], outs[0][-3000:]
    assert "holds the checkpoint of an earlier run" in outs[1], outs[1][-3000:]
    assert not any("Traceback" in out for out in outs)
    assert Checkpoint.load(earlier / "ckpt.pt").iter_num == 5


def test_a_machine_that_redis_refuses_stops_the_other_machines(
    redis7, shakespeare, start_producer, tmp_path
):
    """A refusal while waiting for the contract (here: the second machine's namespace holds
    a contract that is not JSON) reaches every rank at the contract's agreement: that rank
    exits 3 with its reason, the other machine's with exit 2 instead of waiting for it."""
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    redis7.client().set(StreamKeys("broken").meta, b"{not json")
    common = [f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL]
    outs = run_two_machines(
        [*common, "--max_iters=20", f"--out_dir={tmp_path / 'run'}"],
        [[], ["--namespace=broken"]],
        tmp_path,
    )
    assert [p.terminate() for p in producers] == [0, 0]
    assert [out.split("\n", 1)[0] for out in outs] == ["exit 2", "exit 3"], outs[0][-3000:]
    assert "another rank was refused by Redis or found a malformed contract" in outs[0]
    assert "stored meta is not JSON" in outs[1], outs[1][-3000:]
    assert not any("Traceback" in out for out in outs)


def test_a_weights_digest_tells_copies_from_other_checkpoints(tmp_path):
    config = ModelConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8)
    torch.manual_seed(0)
    model = MaskedLM(config).state_dict()
    ckpt = Checkpoint(model=model, model_config=config, itos=list("abcd_"), mask_token_id=4,
                      fingerprint="f", meta={}, iter_num=5)  # fmt: skip
    ckpt.save(tmp_path / "a" / "ckpt.pt")
    copy = Checkpoint.load(tmp_path / "a" / "ckpt.pt")
    assert copy.weights_digest() == ckpt.weights_digest()
    assert 0 <= ckpt.weights_digest() < 2**62
    other = {k: v.clone() for k, v in model.items()}
    next(iter(other.values())).view(-1)[0] += 1e-3
    assert dataclasses.replace(ckpt, model=other).weights_digest() != ckpt.weights_digest()
    halves = {k: v.to(torch.bfloat16) for k, v in model.items()}
    assert dataclasses.replace(ckpt, model=halves).weights_digest() != ckpt.weights_digest()


def _rank_pid(torchrun: subprocess.Popen, rank: int) -> int | None:
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "services.trainer" in " ".join(
                child.cmdline()
            ):
                return child.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.parametrize("ack_policy", ["step", "checkpoint"])
def test_killed_rank_resumes_and_accounts_close(
    redis7, shakespeare, start_producer, tmp_path, ack_policy
):
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    ack_log, run = tmp_path / "acks", tmp_path / "run"
    args = [
        f"--redis_url={redis7.url}",
        f"--corpus_path={shakespeare}",
        *SMALL,
        "--max_iters=60",
        "--eval_interval=30",
        "--checkpoint_interval=10",
        f"--ack_policy={ack_policy}",
        f"--out_dir={run}",
        f"--ack_log={ack_log}",
    ]
    log1 = open(tmp_path / "first.log", "w")  # noqa: SIM115
    first = subprocess.Popen(
        trainer_cmd(2, args), cwd=REPO, env=env(), stdout=log1, stderr=subprocess.STDOUT
    )
    client = redis7.client()
    # Kill rank 1 once a checkpoint exists and a few more steps went by.
    wait_until(lambda: (run / "ckpt.pt").exists(), 120, "the first checkpoint")
    wait_until(lambda: "iter 15/" in (tmp_path / "first.log").read_text(), 120, "iteration 15")
    victim = wait_until(lambda: _rank_pid(first, 1), 10, "rank 1's pid")
    os.kill(victim, signal.SIGKILL)
    assert first.wait(120) != 0
    log1.close()
    crashed_at = Checkpoint.load(run / "ckpt.pt").iter_num
    assert crashed_at < 60
    pending_at_crash = {
        entry["message_id"]
        for entry in client.xpending_range(KEYS.train, "default", min="-", max="+", count=10_000)
    }
    assert pending_at_crash, "the crash left nothing pending"

    out = run_trainer(2, [*args, "--init_from=resume"], tmp_path / "second.log")
    assert [p.terminate() for p in producers] == [0, 0]
    assert f"iter {crashed_at + 5}/60" in out  # it went on from the checkpoint
    assert "entries reclaimed" in out
    acked = acked_entries(ack_log)
    close_accounts(client, acked)  # zero lost, zero acked twice
    acked_ids = {
        line.split()[2].encode()
        for path in tmp_path.glob("acks.rank*")
        for line in path.read_text().splitlines()
    }
    # Whatever was pending at the crash was delivered again and acked once.
    assert pending_at_crash <= acked_ids | {
        e["message_id"] for e in client.xpending_range(KEYS.train, "default", "-", "+", 10_000)
    }
    if ack_policy == "checkpoint":
        # Nothing trained on after the last checkpoint had been acked: all of it
        # was pending at the crash, and so was trained on again after it.
        assert not any(
            line for line in (tmp_path / "first.log").read_text().splitlines() if "double" in line
        )
        reacked = pending_at_crash & acked_ids
        assert len(reacked) >= 2 * 2  # at least the steps after the checkpoint on 2 ranks


def test_bad_entries_are_dead_lettered_while_training_goes_on(
    redis7, shakespeare, start_producer, tmp_path
):
    # First in the stream, so the trainer meets them within its 20 steps.
    client = redis7.client()
    foreign = encode(
        Batch("0" * 16, "train", 0, 0, 0, {"input": torch.zeros(8, 64, dtype=torch.uint8).numpy()})
    )
    client.xadd(KEYS.train, {PAYLOAD_FIELD: foreign})
    client.xadd(KEYS.train, {PAYLOAD_FIELD: b"\xc1 not msgpack"})
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    wait_until(lambda: client.get(KEYS.meta), 60, "the contract")
    meta = json.loads(client.get(KEYS.meta))
    out = run_trainer(
        1,
        [
            f"--redis_url={redis7.url}",
            f"--corpus_path={shakespeare}",
            *SMALL,
            "--max_iters=20",
            "--eval_interval=20",
            f"--out_dir={tmp_path / 'run'}",
        ],
        tmp_path / "trainer.log",
    )
    assert [p.terminate() for p in producers] == [0, 0]
    reasons = sorted(fields[b"reason"].decode() for _, fields in client.xrange(KEYS.dead))
    assert reasons == ["foreign_fingerprint", "malformed"]
    assert "2 dead-lettered" in out and "done at iter 20" in out
    assert meta["fingerprint"] != "0" * 16


def test_loss_falls_and_sampling_works(redis7, shakespeare, start_producer, tmp_path):
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    out = run_trainer(
        1,
        [
            f"--redis_url={redis7.url}",
            f"--corpus_path={shakespeare}",
            *SMALL,
            "--max_iters=150",
            "--eval_interval=75",
            f"--out_dir={tmp_path / 'run'}",
            "--learning_rate=3e-3",
            "--warmup_iters=10",
            "--lr_decay_iters=150",
        ],
        tmp_path / "trainer.log",
    )
    assert [p.terminate() for p in producers] == [0, 0]
    history = Checkpoint.load(tmp_path / "run" / "ckpt.pt").history
    first, last = history[0]["val_loss"], history[-1]["val_loss"]
    assert last < first and last < 0.85 * math.log(66), history
    assert f"val loss {last:.4f}" in out
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.trainer.sample",
            f"--checkpoint={tmp_path / 'run' / 'ckpt.pt'}",
            "--prompt=ROMEO:",
            "--length=40",
            "--steps=8",
            "--seed=1",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sample.returncode == 0, sample.stderr
    assert "ROMEO:" in sample.stdout


def test_ar_baseline_and_elbo_weighted_diffusion_from_the_same_stream_format(
    redis7, shakespeare, start_producer, tmp_path
):
    """objective=ar trains the causal baseline on windows rebuilt from masked
    batches and reports its NLL; a uniform stage with loss_weighting=elbo
    trains the diffusion model on the ELBO and reports the ELBO; the sampler
    judges a diffusion sample with the AR checkpoint."""
    uniform = '--unmasking_stages=[{"type":"uniform"}]'
    producers = start_two_producers(start_producer, redis7.url, shakespeare, [uniform])
    common = [
        f"--redis_url={redis7.url}",
        *SMALL,
        "--max_iters=60",
        "--eval_interval=30",
        "--learning_rate=3e-3",
        "--warmup_iters=10",
        "--lr_decay_iters=60",
    ]
    ar = run_trainer(
        1,
        [
            *common,
            "--objective=ar",
            "--elbo_windows=16",
            "--run_name=ar",
            f"--out_dir={tmp_path / 'ar'}",
        ],
        tmp_path / "ar.log",
    )
    diffusion = run_trainer(
        1,
        [*common, "--loss_weighting=elbo", "--run_name=diff", f"--out_dir={tmp_path / 'diff'}"],
        tmp_path / "diff.log",
    )
    assert [p.terminate() for p in producers] == [0, 0]
    ar_history = Checkpoint.load(tmp_path / "ar" / "ckpt.pt").history
    diff_history = Checkpoint.load(tmp_path / "diff" / "ckpt.pt").history
    assert [h["bound"] for h in ar_history] == ["ar_nll", "ar_nll"]
    assert [h["bound"] for h in diff_history] == ["elbo", "elbo"]
    # The AR NLL takes every validation window at every evaluation, whatever elbo_windows.
    every = diff_history[-1]["windows"]
    assert [h["windows"] for h in ar_history] == [every, every] and every > 16
    # Both learn: below the uniform distribution's ln(66) nats/char, and falling.
    for history in (ar_history, diff_history):
        assert history[-1]["nats_per_char"] < min(history[0]["nats_per_char"], math.log(66))
    assert "val AR NLL" in ar and "val ELBO" in diffusion
    judged = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.trainer.sample",
            f"--checkpoint={tmp_path / 'diff' / 'ckpt.pt'}",
            "--length=40",
            "--steps=8",
            "--order=random",
            f"--judge={tmp_path / 'ar' / 'ckpt.pt'}",
            "--elbo",
            "--elbo_windows=16",
            f"--corpus_path={shakespeare}",
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert judged.returncode == 0, judged.stderr
    assert "generative perplexity" in judged.stdout and "validation ELBO" in judged.stdout


class ListFeed:
    """The trainer's feed interface over micro-batches taken from the stream
    once, so two trainers can be given exactly the same data."""

    def __init__(self, batches: list[MicroBatch]) -> None:
        self.batches, self.i, self.wait_s, self.acked = batches, 0, 0.0, []

    def next(self, stop=None) -> MicroBatch:
        self.i += 1
        return self.batches[self.i - 1]

    def ack(self, entry_ids: list[bytes]) -> None:
        self.acked.extend(entry_ids)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_gives_the_same_next_steps(redis7, shakespeare, start_producer, tmp_path, optimizer):
    """A Trainer resumed from its checkpoint continues exactly as the
    uninterrupted Trainer does on the same batches: model, optimizer, schedule
    and iteration all come back."""
    producer = start_producer(
        f"--redis_url={redis7.url}", *SMALL, f"--corpus_path={shakespeare}", "--metrics_port=0"
    )
    client = connect(redis7.url, block_s=1.0)
    wait_until(lambda: client.xlen(KEYS.train) >= 8, 60, "8 training entries")
    producer.terminate()
    meta = wait_for_contract(client, KEYS, threading.Event())
    args = [
        f"--redis_url={redis7.url}",
        *SMALL,
        f"--out_dir={tmp_path / 'run'}",
        "--warmup_iters=3",
        "--max_iters=8",
        "--trainer_metrics_port=0",
        f"--optimizer={optimizer}",
    ]

    def build(*extra: str) -> Trainer:
        settings = load_settings([*args, *extra], env={}, service=TrainerConfig)
        return Trainer(
            settings, threading.Event(), meta, client=client, dist_info=Dist(), device=CPU
        )

    def steps(trainer: Trainer, count: int) -> list[float]:
        losses = []
        for _ in range(count):
            set_learning_rate(trainer.optimizer, trainer.progress.iter_num, trainer.s)
            losses.append(trainer.train_step().item())
            trainer.progress.iter_num += 1
        return losses

    first = build()
    first.feed.start()
    batches = [first.feed.next() for _ in range(8)]
    first.feed.close()
    first.feed = ListFeed(batches)
    steps(first, 5)
    first.checkpoint()
    uninterrupted = steps(first, 3)

    torch.manual_seed(123)  # a new process starts from other random state
    resumed = build("--init_from=resume")
    assert resumed.progress.iter_num == 5
    resumed.feed.close()
    resumed.feed = ListFeed(batches[5:])
    assert steps(resumed, 3) == uninterrupted
    # And the checkpoint is the run's: a resume under other model settings is refused.
    with pytest.raises(CheckpointError, match="n_layer"):
        build("--init_from=resume", "--n_layer=3")
    # Nor under the other optimizer: its state would not fit the groups.
    other = "muon" if optimizer == "adamw" else "adamw"
    with pytest.raises(CheckpointError, match=f"optimizer={optimizer}, the settings ask for"):
        build("--init_from=resume", f"--optimizer={other}")
    if optimizer == "adamw":
        # A checkpoint of a trainer from before the optimizer setting resumes as AdamW.
        path = tmp_path / "run" / "ckpt.pt"
        old = Checkpoint.load(path)
        del old.settings["optimizer"]
        for group in old.optimizer["param_groups"]:
            del group["lr_scale"]
        old.save(path)
        assert [g["lr_scale"] for g in build("--init_from=resume").optimizer.param_groups] == [
            1.0,
            1.0,
        ]


def test_every_stage_reports_nothing_consumed_before_the_first_step(
    redis7, shakespeare, start_producer, tmp_path
):
    """A rank hung before its first step still has its consumed-batches series, at 0, so
    the TrainerStalled alert (a rate of 0) can see it: a counter with labels otherwise has
    no series until its first increment."""
    from prometheus_client import REGISTRY

    producer = start_producer(
        f"--redis_url={redis7.url}", *SMALL, f"--corpus_path={shakespeare}", "--metrics_port=0"
    )
    client = connect(redis7.url, block_s=1.0)
    meta = wait_for_contract(client, KEYS, threading.Event())
    producer.terminate()
    settings = load_settings(
        [f"--redis_url={redis7.url}", *SMALL, f"--out_dir={tmp_path}", "--trainer_metrics_port=0"],
        env={},
        service=TrainerConfig,
    )
    rank = Dist(rank=7)  # a label no other test's trainer in this process uses
    trainer = Trainer(settings, threading.Event(), meta, client=client, dist_info=rank, device=CPU)
    trainer.feed.close()
    stages = len(meta["stages"]["train"])
    assert stages == 2
    values = [
        REGISTRY.get_sample_value(
            "maskstream_consumed_batches_total", {"rank": "7", "stage": str(stage)}
        )
        for stage in range(stages)
    ]
    assert values == [0.0, 0.0]


@pytest.mark.parametrize("module", ["services.trainer", "services.local"])
def test_a_checkpoint_is_not_replaced_by_the_default(tmp_path, module):
    """init_from's default ("scratch") on an out_dir that holds a checkpoint: exit 2 with
    the choices, the file untouched, nothing started; an explicit --init_from=scratch is
    the way to replace it."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    ckpt = out_dir / "ckpt.pt"
    ckpt.write_bytes(b"an earlier run's weights")
    args = [sys.executable, "-m", module, *SMALL, f"--out_dir={out_dir}"]
    proc = subprocess.run(
        [*args, "--redis_url=redis://127.0.0.1:9/0"],  # never reached
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert f"{ckpt} holds the checkpoint of an earlier run" in said
    assert "--init_from=resume continues it, --init_from=scratch replaces it" in said
    assert ckpt.read_bytes() == b"an earlier run's weights"
    assert "on port" not in said  # services.local started no Redis


def test_waiting_without_producers_then_stopping(redis7, tmp_path):
    """No contract in Redis yet: the trainer waits, and SIGTERM ends it cleanly."""
    proc = subprocess.Popen(
        trainer_cmd(1, [f"--redis_url={redis7.url}", *SMALL, f"--out_dir={tmp_path}"]),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first_line = proc.stdout.readline()
    assert (
        "waiting for producers" in first_line or "waiting for producers" in proc.stdout.readline()
    )
    proc.terminate()
    assert proc.wait(30) == 0


# ------------------------------------------------------------------ poison


def _pack_map(pairs: list[tuple[object, object]]) -> bytes:
    """A msgpack map from pairs as given: duplicate and non-string keys too."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(
        msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True) for k, v in pairs
    )


def poison_entries(meta: dict) -> list[tuple[str, dict[bytes, bytes]]]:
    """(expected reason, entry fields): one hand-made bad entry of each kind,
    producer 9000 + its index so none can be mistaken for a real entry."""
    B, T = meta["batch_size"], meta["block_size"]
    mask, ignore = meta["mask_token_id"], meta["label_ignore_value"]
    good_in, good_labels = bytes(B * T), bytes([ignore]) * (B * T)

    def pairs(i: int, **change) -> list[tuple[object, object]]:
        tensors = {
            "input": ["uint8", [B, T], change.pop("input", good_in)],
            "labels": ["uint8", [B, T], change.pop("labels", good_labels)],
        }
        base = {
            "v": 1,
            "fp": meta["fingerprint"],
            "split": "train",
            "stage": 0,
            "producer": 9000 + i,
            "seq": i,
            "t": 1.0,
            "tensors": tensors,
        }
        return list({**base, **change}.items())

    def entry(payload: bytes) -> dict[bytes, bytes]:
        return {PAYLOAD_FIELD: payload}

    valid = _pack_map(pairs(99))
    return [
        ("bad_tokens", entry(_pack_map(pairs(0, input=bytes([200]) * (B * T))))),
        ("bad_labels", entry(_pack_map(pairs(1, labels=bytes([100]) * (B * T))))),
        ("bad_labels", entry(_pack_map(pairs(2, labels=bytes([mask]) * (B * T))))),
        (
            "bad_shape",
            entry(
                _pack_map(
                    pairs(
                        3,
                        tensors={
                            "input": ["uint8", [0, 2**63], b""],
                            "labels": ["uint8", [0], b""],
                        },
                    )
                )
            ),
        ),
        ("unknown_field", entry(_pack_map([*pairs(4), ("extra", 1)]))),
        ("wrong_type", entry(_pack_map([*pairs(5), (7, 1)]))),
        ("duplicate_key", entry(_pack_map([*pairs(6), ("v", 1)]))),
        ("bad_entry_fields", {PAYLOAD_FIELD: _pack_map(pairs(7)), b"x": b"1"}),
        ("wrong_split", entry(_pack_map(pairs(8, split="val")))),
        ("bad_stage", entry(_pack_map(pairs(9, stage=99)))),
        ("oversized", entry(b"\xdd" + (2**22).to_bytes(4, "big") + b"\xc4\x00" * 2**22)),
        ("foreign_fingerprint", entry(_pack_map(pairs(11, fp="0" * 16)))),
        ("malformed", entry(valid[:50])),
        ("unsupported_version", entry(_pack_map(pairs(13, v=2)))),
        ("out_of_range", entry(_pack_map(pairs(14, t=math.nan)))),
        ("out_of_range", entry(_pack_map(pairs(15, producer=2**64 - 1)))),
        ("bad_entry_fields", {b"x": valid}),
        (
            "schema_mismatch",
            entry(
                _pack_map(
                    pairs(
                        17,
                        tensors={
                            "input": ["uint8", [B, T - 1], bytes(B * (T - 1))],
                            "labels": ["uint8", [B, T], good_labels],
                        },
                    )
                )
            ),
        ),
        ("malformed", entry(b"\xc1" * 32)),
        ("wrong_type", entry(_pack_map(pairs(19, t="yesterday")))),
    ]


def test_poison_entries_are_dead_lettered_and_training_finishes(
    redis7, shakespeare, start_producer, tmp_path
):
    """Every kind of bad entry, written straight into the streams, goes to the
    dead-letter stream with its reason; the trainer trains on none of them,
    skips a bad validation entry, and exits 0."""
    producer = start_producer(
        f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL, "--max_backlog=16"
    )
    client = redis7.client()
    wait_until(lambda: client.xlen(KEYS.train) >= 16, 60, "a full backlog")
    meta = wait_for_contract(client, KEYS, threading.Event())
    cases = poison_entries(meta)
    assert len(cases) >= 14 and len({reason for reason, _ in cases}) >= 14
    ids = {client.xadd(KEYS.train, fields): reason for reason, fields in cases}
    client.xadd(KEYS.val, {PAYLOAD_FIELD: b"\xc1 not a batch"})  # a poisoned validation set
    ack_log = tmp_path / "acks"
    out = run_trainer(
        1,
        [
            f"--redis_url={redis7.url}",
            *SMALL,
            "--max_iters=40",
            "--eval_interval=20",
            "--prefetch_batches=4",  # room for 1 x 2 + 2 x 4 held entries in a backlog of 16
            f"--out_dir={tmp_path / 'run'}",
            f"--ack_log={ack_log}",
        ],
        tmp_path / "trainer.log",
    )
    assert producer.terminate() == 0
    dead = {fields[b"id"]: fields for _, fields in client.xrange(KEYS.dead)}
    for entry_id, reason in ids.items():
        assert entry_id in dead, f"{reason} entry {entry_id} was not dead-lettered"
        assert dead[entry_id][b"reason"].decode() == reason, dead[entry_id][b"detail"]
    # Each record is bounded: 4 KiB of the payload, its length and hash.
    oversized = next(e for e, r in ids.items() if r == "oversized")
    record = dead[oversized]
    payload = dict(cases)["oversized"][PAYLOAD_FIELD]
    assert int(record[b"payload_bytes"]) == len(payload) > 8 * 2**20
    assert record[b"payload_sha256"].decode() == hashlib.sha256(payload).hexdigest()
    assert record[b"payload_head"] == payload[:4096]
    assert sum(len(k) + len(v) for k, v in record.items()) < 6000
    acked = acked_entries(ack_log)
    assert not [key for key in acked if key[0] >= 9000], "a poison entry was trained on"
    assert "skipping validation entry" in out
    close_accounts(client, acked)


def test_an_entry_that_fails_every_step_is_dead_lettered_after_max_deliveries(
    redis7, shakespeare, start_producer, tmp_path
):
    """A valid entry a step cannot use (a test hook makes the step raise on
    producer 0, seq 5) crashes the trainer max_deliveries times, then the
    restarted trainer dead-letters it and finishes."""
    producer = start_producer(
        f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL, "--max_backlog=32"
    )
    ack_log = tmp_path / "acks"
    args = [
        f"--redis_url={redis7.url}",
        *SMALL,
        "--max_iters=20",
        "--eval_interval=20",
        "--max_deliveries=2",
        f"--out_dir={tmp_path / 'run'}",
        f"--ack_log={ack_log}",
    ]
    codes = []
    for attempt in range(3):
        with open(tmp_path / f"attempt{attempt}.log", "w") as out:
            codes.append(
                subprocess.run(
                    trainer_cmd(1, args),
                    cwd=REPO,
                    env={**env(), "MASKSTREAM_TEST_FAIL_ON": "0:5"},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=300,
                ).returncode
            )
    assert producer.terminate() == 0
    assert codes == [1, 1, 0], [
        (tmp_path / f"attempt{i}.log").read_text()[-2000:] for i in range(3)
    ]
    assert "training step failed on entries" in (tmp_path / "attempt0.log").read_text()
    client = redis7.client()
    records = [fields for _, fields in client.xrange(KEYS.dead)]
    assert [(r[b"reason"], int(r[b"producer"]), int(r[b"seq"])) for r in records] == [
        (b"delivery_limit", 0, 5)
    ]
    assert b"2 training steps failed" in records[0][b"detail"]
    assert client.hlen(KEYS.failures("default")) == 0  # forgotten once acked or dead
    close_accounts(client, acked_entries(ack_log))


def test_kills_of_a_healthy_trainer_dead_letter_nothing(
    redis7, shakespeare, start_producer, tmp_path
):
    """SIGKILL mid-run, three times, with max_deliveries=1 and acks held until
    checkpoints (so the same entries come back after every kill): nothing
    valid is dead-lettered, and the accounts close."""
    producer = start_producer(
        f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL, "--max_backlog=64"
    )
    ack_log, run = tmp_path / "acks", tmp_path / "run"
    args = [
        f"--redis_url={redis7.url}",
        *SMALL,
        "--max_iters=60",
        "--eval_interval=60",
        "--checkpoint_interval=10",
        "--ack_policy=checkpoint",
        "--max_deliveries=1",
        "--reclaim_idle_ms=0",
        f"--out_dir={run}",
        f"--ack_log={ack_log}",
    ]
    for kill in range(3):
        log = tmp_path / f"killed{kill}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                trainer_cmd(1, [*args, "--init_from=resume"] if kill else args),
                cwd=REPO,
                env=env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            wait_until(
                lambda log=log: (
                    "/60:" in log.read_text().rpartition("checkpoint at iter")[2]
                    and "checkpoint at iter" in log.read_text()
                ),
                120,
                "a step after a checkpoint",
            )
            proc.kill()
            proc.wait(30)
    out = run_trainer(1, [*args, "--init_from=resume"], tmp_path / "final.log")
    assert producer.terminate() == 0
    client = redis7.client()
    assert client.xlen(KEYS.dead) == 0, client.xrange(KEYS.dead)
    assert "val loss" in out
    close_accounts(client, acked_entries(ack_log))


# ------------------------------------------------------------- clear errors


def test_a_refused_password_exits_2_naming_the_setting(tmp_path, shakespeare):
    """Producer and trainer alike: a wrong password is not an outage to wait
    out, and no traceback."""
    with RedisServer(extra_args=["--requirepass", "right-password-123"]) as server:
        for module, extra in (
            ("services.producer", [f"--corpus_path={shakespeare}", "--metrics_port=0"]),
            ("services.trainer", [f"--out_dir={tmp_path}", "--trainer_metrics_port=0"]),
        ):
            run = subprocess.run(
                [sys.executable, "-m", module, f"--redis_url={server.url}", *SMALL, *extra],
                cwd=REPO,
                env={**env(), "REDIS_PASSWORD": "wrong-password-123"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode == 2, (module, run.stderr[-2000:])
            assert "redis_password_file" in run.stderr and "Traceback" not in run.stderr


def test_an_unreadable_checkpoint_exits_3_naming_the_file(
    redis7, shakespeare, start_producer, tmp_path
):
    producer = start_producer(f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    run = subprocess.run(
        trainer_cmd(
            1, [f"--redis_url={redis7.url}", *SMALL, f"--out_dir={tmp_path}", "--init_from=resume"]
        ),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert producer.terminate() == 0
    assert run.returncode == 3, run.stderr[-2000:]
    assert f"checkpoint {tmp_path / 'ckpt.pt'} cannot be read" in run.stderr
    assert "Traceback" not in run.stderr


def start_logged_trainer(url: str, log_path: Path, *args: str) -> subprocess.Popen:
    """One rank in the background, its output in ``log_path``."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            trainer_cmd(1, [f"--redis_url={url}", *SMALL, *args]),
            cwd=REPO,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_a_trainer_started_before_redis_waits_for_it(shakespeare, start_producer, tmp_path):
    server = RedisServer()
    trainer = start_logged_trainer(
        server.url, tmp_path / "trainer.log", "--max_iters=10", f"--out_dir={tmp_path / 'run'}"
    )
    try:
        wait_until(
            lambda: "Redis is unavailable" in (tmp_path / "trainer.log").read_text(), 60, "the wait"
        )
        server.start()
        producer = start_producer(
            f"--redis_url={server.url}", f"--corpus_path={shakespeare}", *SMALL
        )
        assert trainer.wait(120) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
        assert producer.terminate() == 0
    finally:
        if trainer.poll() is None:
            trainer.kill()
        server.stop()
    assert "Redis answers again" in (tmp_path / "trainer.log").read_text()


def test_a_second_trainer_on_a_run_directory_in_use_exits_2(tmp_path):
    # The lock is taken before Redis is reached: no server needed, and nothing written.
    held = hold_out_dir(tmp_path)
    try:
        run = subprocess.run(
            trainer_cmd(1, ["--redis_url=redis://127.0.0.1:1/0", *SMALL, f"--out_dir={tmp_path}"]),
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        held.close()
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"out_dir {tmp_path} is in use by another trainer (pid {os.getpid()} on" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "ckpt.pt").exists()


def test_the_run_directory_lock_is_exclusive_and_released_on_close(tmp_path):
    first = hold_out_dir(tmp_path)
    with pytest.raises(OutDirInUse, match=f"pid {os.getpid()} on "):
        hold_out_dir(tmp_path)
    first.close()
    hold_out_dir(tmp_path).close()  # free again


def test_an_out_dir_that_cannot_be_written_exits_2_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run = subprocess.run(
        trainer_cmd(
            1, ["--redis_url=redis://127.0.0.1:1/0", *SMALL, f"--out_dir={blocker / 'run'}"]
        ),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"out_dir {blocker / 'run'} cannot be written" in run.stderr
    assert "--out_dir" in run.stderr and "Traceback" not in run.stderr


def _file_size_limit(limit: int):
    """For preexec_fn: writes past ``limit`` bytes fail with EFBIG (no signal), as a full
    disk fails them, without needing a small filesystem or root."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    return apply


def train_on_a_full_disk(
    redis7, shakespeare, start_producer, tmp_path, world: int, extra: list[str] = ()
) -> subprocess.CompletedProcess:
    """12 steps, a checkpoint every 4, with every file capped at 300 KB (a checkpoint here
    is over 1 MB): each checkpoint fails as on a full disk."""
    producer = start_producer(f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL)
    run = subprocess.run(
        trainer_cmd(
            world,
            [
                f"--redis_url={redis7.url}",
                *SMALL,
                "--max_iters=12",
                "--checkpoint_interval=4",
                *extra,
                f"--out_dir={tmp_path}",
            ],
        ),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(300_000),
    )
    assert producer.terminate() == 0
    return run


def test_checkpoints_that_cannot_be_written_do_not_stop_training(
    redis7, shakespeare, start_producer, tmp_path
):
    """A full disk at checkpoint time: each failure is logged and training goes on; at the
    end the trainer says its last steps are not on disk and exits 2. What killed writers
    left is removed at start."""
    stale = tmp_path / ".ckpt.pt.k1ll3d.tmp"
    stale.write_bytes(bytes(100_000))
    run = train_on_a_full_disk(redis7, shakespeare, start_producer, tmp_path, world=1)
    assert run.returncode == 2, run.stderr[-3000:]
    failures = re.findall(r"cannot write checkpoint \S+: \[Errno 27\] File too large", run.stderr)
    assert len(failures) == 4, run.stderr[-3000:]  # iters 4, 8, 12, and 12 again at the end
    assert run.stderr.count("training goes on and the next checkpoint tries again") == 4
    assert "done at iter 12: 12 entries acked" in run.stderr
    assert f"the last checkpoint could not be written to {tmp_path}" in run.stderr
    assert "removed 0.1 MB of checkpoint writes a killed trainer left" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "ckpt.pt").exists() and not list(tmp_path.glob(".ckpt.pt.*"))


@pytest.mark.slow
def test_two_ranks_agree_on_a_failed_checkpoint_and_finish_together(
    redis7, shakespeare, start_producer, tmp_path
):
    """Only the first rank writes: the others must learn the outcome, or the first would
    wait alone in the run's last checkpoint for a rank that already left."""
    run = train_on_a_full_disk(redis7, shakespeare, start_producer, tmp_path, world=2)
    assert run.returncode != 0, run.stderr[-3000:]  # rank 0 exits 2
    assert run.stderr.count("training goes on and the next checkpoint tries again") == 4
    assert "the last checkpoint could not be written" in run.stderr
    assert "done at iter 12: " in run.stderr
    # The only traceback is torchrun's report of rank 0's exit code 2.
    assert run.stderr.count("Traceback") == 1 and "exitcode  : 2" in run.stderr


def test_under_ack_policy_checkpoint_a_failed_checkpoint_acks_nothing_and_exits_2(
    redis7, shakespeare, start_producer, tmp_path
):
    run = train_on_a_full_disk(
        redis7, shakespeare, start_producer, tmp_path, world=1, extra=["--ack_policy=checkpoint"]
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "entries are acked only once it is: stopping, the 4 entries held" in run.stderr
    assert "Traceback" not in run.stderr and "training goes on" not in run.stderr
    groups = redis7.client().xinfo_groups("maskstream:train")
    assert sum(group["pending"] for group in groups) >= 4  # held, to be delivered again


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"the previous checkpoint")
    state = Checkpoint(
        model={"w": torch.zeros(200_000)},
        model_config=ModelConfig(vocab_size=3, block_size=8),
        itos=["a", "b", "[MASK]"],
        mask_token_id=2,
    )
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(CheckpointWriteError, match=f"cannot write checkpoint {path}: "):
            state.save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    assert path.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_key_replaced_by_another_type_is_waited_out_until_an_operator_deletes_it(
    redis7, shakespeare, start_producer, tmp_path
):
    """Someone SETs a string where the stream was (and a hash where the bound was): Redis
    answers WRONGTYPE to every stream command. Nobody crashes: producers and trainer say
    which keys to delete and wait; once the stream key is deleted, the run finishes."""
    client = redis7.client()
    producer = start_producer(f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL)
    wait_until(lambda: client.get("maskstream:val:done") is not None, 60, "the validation set")
    client.delete("maskstream:train")
    client.set("maskstream:train", "not a stream")
    client.delete("maskstream:train:max_backlog")
    client.hset("maskstream:train:max_backlog", "x", "1")
    log_path = tmp_path / "trainer.log"
    trainer = start_logged_trainer(
        redis7.url, log_path, "--max_iters=10", f"--out_dir={tmp_path / 'run'}"
    )
    try:
        wait_until(lambda: "WRONGTYPE" in log_path.read_text(), 60, "the trainer's message")
        wait_until(
            lambda: "WRONGTYPE" in producer.log_path.read_text(), 60, "the producer's message"
        )
        assert trainer.poll() is None and producer.proc.poll() is None
        client.delete("maskstream:train")  # the operator's fix
        assert trainer.wait(120) == 0, log_path.read_text()[-3000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert producer.terminate() == 0
    text = log_path.read_text()
    assert "holds another kind of value" in text and "Traceback" not in text
    assert "done at iter 10: 10 entries acked" in text


def test_a_contract_overwritten_mid_run_is_reported_and_the_trainer_keeps_going(
    redis7, shakespeare, start_producer, tmp_path
):
    """Someone writes another contract over <ns>:meta: this run's producers refuse it
    (exit 3) and the trainer starves; it says why, and that the contract is back once
    it is, and stops cleanly when asked."""
    client = redis7.client()
    producer = start_producer(f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL)
    log_path = tmp_path / "trainer.log"
    trainer = start_logged_trainer(
        redis7.url, log_path, "--max_iters=99999", f"--out_dir={tmp_path}"
    )
    try:
        wait_until(lambda: "[  0%] iter" in log_path.read_text(), 120, "training")
        ours = client.get("maskstream:meta")
        other = {**json.loads(ours), "block_size": 32, "fingerprint": "0123456789abcdef"}
        client.set("maskstream:meta", json.dumps(other))
        wait_until(
            lambda: "this run's producers refuse it and stop" in log_path.read_text(), 30, "error"
        )
        assert "block_size: 32 -> 64" in log_path.read_text()
        assert producer.wait(30) == 3
        client.set("maskstream:meta", ours)
        wait_until(
            lambda: "maskstream:meta holds this run's contract again" in log_path.read_text(),
            30,
            "the all-clear",
        )
        assert trainer.poll() is None
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert "Traceback" not in log_path.read_text()


# A learning rate of 1e30 sends the weights past float32's range within a few steps: from
# then on every gradient is NaN.
DIVERGE = [
    "--eval_interval=1000", "--optimizer=adamw", "--learning_rate=1e30", "--min_lr=1e30",
    "--warmup_iters=0",
]  # fmt: skip


def run_captured(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)


def test_a_diverged_model_stops_with_exit_2_and_keeps_the_last_finite_checkpoint(
    redis7, shakespeare, start_producer, tmp_path
):
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    common = [
        f"--redis_url={redis7.url}",
        f"--corpus_path={shakespeare}",
        *SMALL,
        f"--out_dir={tmp_path / 'run'}",
        "--eval_interval=1000",
        "--optimizer=adamw",
        "--init_from=resume",
        "--warmup_iters=0",
        "--checkpoint_interval=1",
        "--log_interval=1",
    ]
    run_trainer(1, [*common[:-4], "--max_iters=10"], tmp_path / "first.log")

    def train(*args: str) -> subprocess.CompletedProcess:
        return run_captured(trainer_cmd(1, [*common, *args]))

    diverge = ["--max_iters=200", "--learning_rate=1e30", "--min_lr=1e30"]  # as DIVERGE
    diverging = train(*diverge, "--max_nonfinite_steps=5")
    err = diverging.stderr
    assert diverging.returncode == 2, err[-3000:]
    stopped = re.search(r"(\d+) steps in a row \(up to iter (\d+)\) had a non-finite", err)
    assert stopped and int(stopped.group(1)) >= 5, err[-3000:]
    assert "Traceback" not in err and "--learning_rate" in err
    # The first step at 1e30 leaves weights whose norm overflows: not checkpointed either.
    assert "not checkpointing at iter 11: the weights are not finite" in err
    assert "holds the last one written, at iter 10" in err
    ckpt = Checkpoint.load(tmp_path / "run" / "ckpt.pt")
    assert ckpt.iter_num == 10
    assert all(torch.isfinite(v).all() for v in ckpt.model.values())
    # A restart with the same settings (a restart policy's) is refused at once...
    again = train(*diverge, "--max_nonfinite_steps=5")
    assert again.returncode == 2, again.stderr[-3000:]
    assert "with these same settings diverged at iter" in again.stderr
    assert "Traceback" not in again.stderr
    # ...and one with a setting changed resumes from iter 10 and trains on.
    fixed = train("--max_iters=20", "--learning_rate=1e-3", "--max_nonfinite_steps=5")
    assert [p.terminate() for p in producers] == [0, 0]
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert not (tmp_path / "run" / "diverged.json").exists()
    assert Checkpoint.load(tmp_path / "run" / "ckpt.pt").iter_num == 20


def test_two_ranks_that_diverge_stop_together_with_exit_2(
    redis7, shakespeare, start_producer, tmp_path
):
    """Every rank reads the same counters at the same iterations: both stop, none hangs in
    a collective, and the launcher passes the ranks' exit code 2 through torchrun."""
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    run = run_captured(
        [
            sys.executable, "-m", "services.trainer.launch", "--nproc_per_node=2",
            f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL,
            f"--out_dir={tmp_path / 'run'}", *DIVERGE, "--max_iters=200",
            "--checkpoint_interval=3", "--log_interval=2", "--max_nonfinite_steps=4",
        ]
    )  # fmt: skip
    assert [p.terminate() for p in producers] == [0, 0]
    err = run.stdout + run.stderr
    assert run.returncode == 2, err[-3000:]
    assert "launch: rank0 exited 2" in err or "launch: rank1 exited 2" in err, err[-3000:]
    assert "Traceback" not in err  # torchrun's own, of its ChildFailedError, is left out
    assert len(re.findall(r"steps in a row \(up to iter \d+\) had a non-finite", err)) == 2
    assert "no checkpoint was written" in err
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    assert (tmp_path / "run" / "diverged.json").exists()


def test_training_that_ends_with_diverged_weights_exits_2_without_checkpointing_them(
    redis7, shakespeare, start_producer, tmp_path
):
    producers = start_two_producers(start_producer, redis7.url, shakespeare)
    run = run_captured(
        trainer_cmd(
            1,
            [
                f"--redis_url={redis7.url}", f"--corpus_path={shakespeare}", *SMALL,
                f"--out_dir={tmp_path / 'run'}", *DIVERGE, "--max_iters=12",
                "--max_nonfinite_steps=0",  # never stops early: the end decides
            ],
        )
    )  # fmt: skip
    assert [p.terminate() for p in producers] == [0, 0]
    assert run.returncode == 2, run.stderr[-3000:]
    assert "training ended (iter 12) with weights that are not finite" in run.stderr
    assert not (tmp_path / "run" / "ckpt.pt").exists()
