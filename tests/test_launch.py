"""services.trainer.launch: mistakes are one clear message and exit 2, and a rank's own
exit code 2 or 3 comes through torchrun (which reports any failed rank as 1)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from services.trainer.launch import nodes_arguments, relay_stderr
from tests.helpers import REPO, SMALL_RECIPE


def launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.trainer.launch", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--nproc_per_node=1", "--max_iter=5"], "unknown setting 'max_iter'"),
        (["--nproc_per_node", "1"], "give --nproc_per_node=N (or =gpu) as one argument"),
        (["--nproc_per_node=0"], "use a positive integer, or gpu"),
        (["--nproc_per_node=1", "--learning_rate=-1"], "learning_rate"),
        (["--nnodes", "2"], "give --nnodes=M as one argument"),
        (["--nproc-per-node", "2"], "give --nproc_per_node=N (or =gpu) as one argument"),
        (["--nnodes=\u00b2"], "use an integer from 1"),
        (["--nproc_per_node=\u00b2"], "use a positive integer, or gpu"),
        (["--nnodes=2", "--master_addr=10.0.0.1"], "--nnodes=2 needs --node_rank=K (0 to 1"),
        (["--nnodes=2", "--node_rank=0"], "and --master_addr=HOST"),
        (
            ["--nnodes=2", "--node_rank=2", "--master_addr=h"],
            "--node_rank=2: use an integer from 0 to 1",
        ),
        (["--nnodes=0"], "--nnodes=0: use an integer from 1"),
        (["--node_rank=1"], "--node_rank is for several machines: give --nnodes=M too"),
        (
            ["--nnodes=2", "--node_rank=1", "--master_addr=h", "--master_port=http"],
            "--master_port=http",
        ),
    ],
)
def test_a_mistake_is_one_message_before_torchrun_starts(args, said):
    proc = launch(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert said in proc.stderr
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr


def test_one_rank_per_gpu_without_a_gpu_says_what_to_give_instead():
    if torch.cuda.is_available():
        pytest.fail("this machine has a GPU: --nproc_per_node=gpu would start one rank per GPU")
    proc = launch("--nproc_per_node=gpu")
    assert proc.returncode == 2
    assert "torch sees no GPU" in proc.stderr and "--nproc_per_node=2 --device=cpu" in proc.stderr


def test_a_ranks_own_exit_code_comes_through_torchrun(tmp_path):
    """device=cuda without a GPU: valid settings, but the rank stops with exit 2 (a setting
    to fix); torchrun says 1, the launcher says 2."""
    if torch.cuda.is_available():
        pytest.fail("this machine has a GPU: the rank would not refuse device=cuda")
    proc = launch(
        "--nproc_per_node=1", *SMALL_RECIPE, "--device=cuda",
        "--redis_url=redis://127.0.0.1:9/0", f"--out_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "device=cuda but torch sees no GPU" in proc.stdout + proc.stderr
    assert "launch: rank0 exited 2" in proc.stderr


def test_the_machines_of_a_run_become_torchruns_rendezvous():
    assert nodes_arguments({}) == ["--standalone"]
    assert nodes_arguments({"nnodes": "1"}) == ["--standalone"]
    several = {"nnodes": "4", "node_rank": "3", "master_addr": "node0.cluster"}
    assert nodes_arguments(several) == [
        "--nnodes=4", "--node_rank=3", "--master_addr=node0.cluster", "--master_port=29500",
    ]  # fmt: skip
    assert nodes_arguments({**several, "master_port": "1234"})[-1] == "--master_port=1234"


def test_torchruns_own_traceback_is_left_out_and_a_ranks_passes_whole():
    rank_traceback = (
        b"Traceback (most recent call last):\n"
        b'  File "services/trainer/train.py", line 1, in run\n'
        b"    step()\n"
        b"RuntimeError: a bug\n"
    )
    torchrun_traceback = (
        b"Traceback (most recent call last):\n"
        b'  File "torch/distributed/run.py", line 1032, in <module>\n'
        b"    main()\n"
    )
    summary = (  # torchrun's exception line heads it
        b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        b"=====\nservices.trainer FAILED\n  exitcode  : 2 (pid: 7)\n=====\n"
    )
    unfinished = b'Traceback (most recent call last):\n  File "x.py", line 2\n'
    source = io.BytesIO(
        b"ERROR the rank says why\n" + rank_traceback + torchrun_traceback + summary + unfinished
    )
    sink = io.BytesIO()
    relay_stderr(source, sink)
    assert sink.getvalue() == (b"ERROR the rank says why\n" + rank_traceback + summary + unfinished)


def test_a_relay_whose_stderr_is_gone_reads_on_so_the_ranks_never_block():
    class Gone(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    source = io.BytesIO(b"a rank's line\n" * 100_000)
    relay_stderr(source, Gone())
    assert source.tell() == len(source.getvalue())  # read to the end
