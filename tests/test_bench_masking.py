"""`make bench-masking` on a toy budget: one row per schedule, ratios against the first,
the ELBO a real bound (at most ln V for a model that has barely trained), and a bad
stage refused with its field."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from tests.helpers import REPO

TOY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--max_iters=4",
       "--warmup_iters=1", "--lr_decay_iters=4", "--elbo_nodes=2", "--torch_threads=1"]  # fmt: skip


def bench(shakespeare, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_masking", *TOY, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "CORPUS_PATH": str(shakespeare)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_one_row_per_schedule_with_ratios_against_the_first(shakespeare):
    out = bench(
        shakespeare,
        '--schedules=[[{"type":"random","max_masked_ratio":0.6}],[{"type":"uniform"}]]',
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if re.match(r"schedule \d", line)]
    assert [r[1] for r in rows] == ["0", "1"], out.stdout
    elbos, ratios = [float(r[2]) for r in rows], [float(r[4]) for r in rows]
    assert ratios[0] == 1.0 and ratios[1] == round(elbos[1] / elbos[0], 3)
    # 4 steps from a random init: close to the uniform distribution's ln(vocab), not above.
    assert all(3.0 < e <= math.log(66) + 0.1 for e in elbos), elbos
    probes = [float(v) for v in rows[0][5:10]]
    assert len(probes) == 5 and all(math.isfinite(v) for v in probes)


def test_a_bad_stage_is_refused_with_its_field(shakespeare):
    out = bench(shakespeare, '--schedules=[[{"type":"random","max_masked_ratio":1.5}]]')
    assert out.returncode != 0
    assert "max_masked_ratio" in out.stderr
