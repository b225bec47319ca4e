"""``python -m services.trainer.launch [--nproc_per_node=N] [--key=value ...]``:
torchrun on this machine's GPUs (or N CPU processes), stopped cleanly.

torchrun forwards SIGTERM to its ranks but then exits 1 itself, even when
every rank checkpointed and exited 0; a container's restart policy or a script
then sees a failure. This launcher runs torchrun in its own session and, on
SIGTERM or Ctrl-C, signals the ranks directly: they finish their step,
checkpoint and exit 0, and torchrun, seeing every rank succeed, exits 0. The
launcher exits with torchrun's code. Every ``--key=value`` goes to the ranks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shared.exit_codes import ExitCode

GRACE_S = 120.0  # for the ranks to finish a step and checkpoint


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: split after it.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _default_nproc() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    nproc = next((a.split("=", 1)[1] for a in argv if a.startswith("--nproc_per_node=")), None)
    settings = [a for a in argv if not a.startswith("--nproc_per_node=")]
    if nproc is not None and nproc != "gpu" and not (nproc.isdigit() and int(nproc) >= 1):
        print(
            f"launch: --nproc_per_node={nproc}: use a positive integer, or gpu (one per GPU)",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc or _default_nproc()}",
        "--max-restarts=0",
        "-m",
        "services.trainer",
        *settings,
    ]
    stopping = threading.Event()
    signalled: set[int] = set()
    torchrun: subprocess.Popen | None = None

    def signal_ranks() -> None:
        """SIGTERM every rank not signalled yet (ranks that appear later too)."""
        if torchrun is None:
            return
        for pid in _children(torchrun.pid):
            if pid not in signalled:
                signalled.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def stop(signum: int, _frame: object) -> None:
        if stopping.is_set():
            return
        stopping.set()
        print(
            f"launch: {signal.Signals(signum).name}: asking the ranks to checkpoint and stop",
            file=sys.stderr,
            flush=True,
        )
        signal_ranks()

    # Before torchrun starts: a signal in between must not orphan it.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    torchrun = subprocess.Popen(command, start_new_session=True)
    deadline: float | None = None
    while True:
        try:
            return torchrun.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if not stopping.is_set():
                continue
            signal_ranks()  # ranks that were still starting when the signal came
            deadline = deadline or time.monotonic() + GRACE_S
            if time.monotonic() < deadline:
                continue
        print("launch: the ranks did not stop in time; stopping torchrun", file=sys.stderr)
        torchrun.terminate()
        try:
            return torchrun.wait(timeout=30)
        except subprocess.TimeoutExpired:
            torchrun.kill()
            return torchrun.wait()


if __name__ == "__main__":
    sys.exit(main())
