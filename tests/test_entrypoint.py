"""deploy/docker/trainer-entrypoint.sh: resume what is there, never start over silently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

ENTRYPOINT = REPO / "deploy" / "docker" / "trainer-entrypoint.sh"


def entrypoint(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"  # `python` as the image has it: this test's interpreter
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"
    if not python.exists():  # a wrapper, not a link: a venv's python finds its packages by path
        python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if k not in ("INIT_FROM", "OUT_DIR")}
    environ.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        ["sh", str(ENTRYPOINT), "--help"],
        cwd=REPO, env=environ, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_checkpoint_in_the_folder_of_before_is_named_not_started_over(tmp_path):
    runs = tmp_path / "runs"
    (runs / "default").mkdir(parents=True)
    (runs / "default" / "ckpt.pt").write_bytes(b"weights")
    out_dir = runs / "tiny" / "default"
    proc = entrypoint(tmp_path, OUT_DIR=str(out_dir), RUN_NAME="default", NPROC_PER_NODE="1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{runs / 'default' / 'ckpt.pt'} is a checkpoint from before" in proc.stderr
    assert "set INIT_FROM=scratch to start over" in proc.stderr
    # Once it is moved (or another start is chosen), the trainer starts: resume or scratch.
    out_dir.mkdir(parents=True)
    (runs / "default" / "ckpt.pt").rename(out_dir / "ckpt.pt")
    proc = entrypoint(tmp_path, OUT_DIR=str(out_dir), RUN_NAME="default", NPROC_PER_NODE="1")
    assert proc.returncode == 0, proc.stderr
    assert "init_from=resume" in proc.stdout
    (out_dir / "ckpt.pt").rename(runs / "default.pt")
    proc = entrypoint(tmp_path, OUT_DIR=str(out_dir), RUN_NAME="default", NPROC_PER_NODE="1")
    assert proc.returncode == 0 and "init_from=scratch" in proc.stdout
