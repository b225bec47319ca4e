"""The local stack (`make demo`) end to end, as a user runs it."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_local_stack_runs_and_stops_cleanly(small_corpus):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.local",
            f"--corpus_path={small_corpus}",
            "--block_size=64",
            "--batch_size=4",
            "--local_seconds=4",
            "--log_interval_s=60",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "validation sample" in out
    consumed = int(re.search(r"consumed ([\d,]+) batches in", out).group(1).replace(",", ""))
    assert consumed > 100
    assert "producers exited with [0, 0]; redis stopped" in out
    assert re.search(r"produced per producer \{0: \d+, 1: \d+\}", out)
