"""`make bench-trainer` on a toy budget: both feeds measured, their ratio printed as
the one the figures give, and the profile's per-step split of the host's time."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from shared.lifecycle import child_env
from tests.helpers import REPO


@pytest.mark.slow
def test_both_feeds_measured_and_profiled(shakespeare):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_trainer", f"--corpus_path={shakespeare}",
         "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4",
         "--torch_threads=1", "--bench_steps=4", "--bench_rounds=1", "--bench_profile=4"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rates = {
        name: float(value.replace(",", ""))
        for name, value in re.findall(r"^(Redis stream, 2 producers|in-memory micro-batches)"
                                      r"\s+([\d,]+)\s", out.stdout, re.M)
    }  # fmt: skip
    assert len(rates) == 2 and all(rate > 0 for rate in rates.values()), out.stdout
    ratio = float(re.search(r"stream / memory: ([\d.]+)", out.stdout).group(1))
    stream, memory = rates["Redis stream, 2 producers"], rates["in-memory micro-batches"]
    assert ratio == pytest.approx(stream / memory, abs=0.001)
    rows = re.findall(
        r"^(Redis stream|in-memory micro-batches)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+n/a$",
        out.stdout,
        re.M,
    )
    assert [r[0] for r in rows] == ["Redis stream", "in-memory micro-batches"], out.stdout
    for _, wall, next_ms, ack_ms in rows:
        assert 0 <= float(next_ms) + float(ack_ms) < float(wall)
    # The in-memory feed does no I/O: its ack is bookkeeping only, the stream's an XACK.
    assert float(rows[1][3]) < float(rows[0][3])
