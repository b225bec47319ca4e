"""``python -m services.trainer.launch [--nproc_per_node=N] [--key=value ...]``:
torchrun on this machine's GPUs (or N CPU processes), stopped cleanly.

On several machines, start it on each with the same settings and
``--nnodes=M --node_rank=K --master_addr=HOST [--master_port=29500]`` (K from 0 to
M-1; HOST: the machine of node 0, reachable from every other). Every node needs
the same ``out_dir`` (a shared filesystem) for checkpoints and resumes.

torchrun forwards SIGTERM to its ranks but then exits 1 itself, even when
every rank checkpointed and exited 0; a container's restart policy or a script
then sees a failure. This launcher runs torchrun in its own session and, on
SIGTERM, SIGHUP or Ctrl-C, signals the ranks directly: they finish their step,
checkpoint and exit 0, and torchrun, seeing every rank succeed, exits 0. The
launcher exits with torchrun's code, or with a rank's own exit code 2 (a setting
to fix) or 3 (another contract), which torchrun reports as 1. Every
``--key=value`` goes to the ranks, checked here first so that a mistake is one
clear message, not one per rank under a torchrun traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from shared.exit_codes import ExitCode

GRACE_S = 120.0  # for the ranks to finish a step and checkpoint
# Where each rank of this launch leaves its exit code when it is not 0 (rank<N>).
EXIT_DIR_ENV = "MASKSTREAM_EXIT_DIR"


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


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def _ranks_code(exit_dir: Path, torchrun_code: int) -> int:
    """torchrun's code, unless a rank said more: its 2 or 3 (the highest, if both)."""
    codes = []
    for path in sorted(exit_dir.glob("rank*")):
        with contextlib.suppress(OSError, ValueError):
            codes.append((int(path.read_text()), path.name))
    told = [(code, rank) for code, rank in codes if code in (ExitCode.CONFIG, ExitCode.CONTRACT)]
    if torchrun_code == 0 or not told:
        return torchrun_code
    code, rank = max(told)
    with contextlib.suppress(OSError):  # a stderr that is gone must not change the code
        print(f"launch: {rank} exited {code} (its log above says why)", file=sys.stderr)
    return code


# The launcher's own options (torchrun's), each given as --name=VALUE: what VALUE is.
OPTIONS = {
    "nproc_per_node": "N (or =gpu)",
    "nnodes": "M",
    "node_rank": "K",
    "master_addr": "HOST",
    "master_port": "PORT",
}


class LaunchError(ValueError):
    """A launcher option that cannot work; the message names it and the fix."""


def _int_option(options: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    value = options.get(name)
    if value is None:
        return default
    if not (value.isdecimal() and value.isascii() and low <= int(value) <= high):
        raise LaunchError(f"--{name}={value}: use an integer from {low} to {high}")
    return int(value)


def nodes_arguments(options: dict[str, str]) -> list[str]:
    """torchrun's arguments for the machines of the run: ``--standalone`` on one, a static
    rendezvous at node 0 (``master_addr``:``master_port``) on several."""
    nnodes = _int_option(options, "nnodes", 1, 1, 65535)
    if nnodes == 1:
        extra = [name for name in ("node_rank", "master_addr", "master_port") if name in options]
        if extra:
            raise LaunchError(
                f"--{extra[0]} is for several machines: give --nnodes=M too (or leave it out)"
            )
        return ["--standalone"]
    if "node_rank" not in options or not options.get("master_addr"):
        raise LaunchError(
            f"--nnodes={nnodes} needs --node_rank=K (0 to {nnodes - 1}, one per machine) and "
            "--master_addr=HOST (node 0's machine, reachable from every other)"
        )
    node_rank = _int_option(options, "node_rank", 0, 0, nnodes - 1)
    port = _int_option(options, "master_port", 29500, 1, 65535)
    return [
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        f"--master_addr={options['master_addr']}",
        f"--master_port={port}",
    ]


def main(argv: list[str] | None = None) -> int:
    from shared.settings import SettingsError, TrainerConfig, load_settings

    argv = sys.argv[1:] if argv is None else argv
    options: dict[str, str] = {}
    settings = []
    for arg in argv:
        name, has_value, value = arg[2:].partition("=")
        name = name.replace("-", "_")  # torchrun's spellings too (--nproc-per-node)
        if not arg.startswith("--") or name not in OPTIONS:
            settings.append(arg)
        elif not has_value:
            print(f"launch: give --{name}={OPTIONS[name]} as one argument", file=sys.stderr)
            return ExitCode.CONFIG
        else:
            options[name] = value
    nproc = options.get("nproc_per_node")
    try:
        nodes = nodes_arguments(options)
    except LaunchError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        load_settings(settings, env=None, service=TrainerConfig, exit_on_help=False)
    except SettingsError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if (
        nproc is not None
        and nproc != "gpu"
        and not (nproc.isdecimal() and nproc.isascii() and int(nproc) >= 1)
    ):
        print(
            f"launch: --nproc_per_node={nproc}: use a positive integer, or gpu (one per GPU)",
            file=sys.stderr,
        )
        return ExitCode.CONFIG
    if nproc in (None, "gpu"):
        gpus = _gpu_count()
        if nproc == "gpu" and not gpus:
            print(
                "launch: --nproc_per_node=gpu but torch sees no GPU: give a number of CPU "
                "processes instead (--nproc_per_node=2 --device=cpu)",
                file=sys.stderr,
            )
            return ExitCode.CONFIG
        nproc = str(max(1, gpus))
    exit_dir = Path(tempfile.mkdtemp(prefix="maskstream-launch-"))
    try:
        return _ranks_code(exit_dir, _run(nproc, nodes, settings, exit_dir))
    finally:
        shutil.rmtree(exit_dir, ignore_errors=True)


# The exception torchrun raises of itself when a rank fails; its summary of the failed ranks
# follows it.
TORCHRUN_FAILURE = b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError"


def relay_stderr(source: IO[bytes], sink: IO[bytes]) -> None:
    """Copy torchrun's stderr (its ranks' too) line by line to ``sink``, leaving out the
    Python traceback torchrun prints of itself when a rank fails: the rank's own log says
    why, and torchrun's summary of the failed ranks stays. Any other traceback (a rank's
    own) passes whole."""
    held: list[bytes] = []  # a traceback's lines, until its exception line says whose
    broken = False  # the launcher's stderr is gone: go on reading, or the ranks would block

    def write(data: bytes) -> None:
        nonlocal broken
        if broken or not data:
            return
        view = memoryview(data)
        try:
            while view:  # a raw file may take part of it
                view = view[sink.write(view) or len(view) :]
            sink.flush()
        except OSError:
            broken = True

    for line in iter(source.readline, b""):
        if held:
            if line[:1] in (b" ", b"\t"):
                held.append(line)
                continue
            if not line.startswith(TORCHRUN_FAILURE):
                write(b"".join(held))
            held = []
        if line.startswith(b"Traceback (most recent call last):"):
            held = [line]
            continue
        write(line)
    write(b"".join(held))


def _run(nproc: str, nodes: list[str], settings: list[str], exit_dir: Path) -> int:
    """torchrun with ``nproc`` ranks here (``nodes``: its arguments for the machines of
    the run), stopped cleanly on SIGTERM, SIGHUP or Ctrl-C; its code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *nodes,
        f"--nproc_per_node={nproc}",
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
        signal_ranks()  # first: a stderr that is gone (a closed terminal) must not stop it
        with contextlib.suppress(OSError):
            print(
                f"launch: {signal.Signals(signum).name}: asked the ranks to checkpoint and stop",
                file=sys.stderr,
                flush=True,
            )

    # Before torchrun starts: a signal in between must not orphan it.
    # SIGHUP too: torchrun, in a session of its own, would outlive a closed terminal.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    torchrun = subprocess.Popen(
        command,
        start_new_session=True,
        env={**os.environ, EXIT_DIR_ENV: str(exit_dir)},
        stderr=subprocess.PIPE,
    )
    # Unbuffered: a relay still writing when the launcher exits holds no buffer's lock.
    try:
        stderr = open(2, "wb", buffering=0, closefd=False)  # noqa: SIM115
    except OSError:  # no stderr at all: read on, keep nothing
        stderr = open(os.devnull, "wb", buffering=0)  # noqa: SIM115
    relay = threading.Thread(
        target=relay_stderr, args=(torchrun.stderr, stderr), name="stderr", daemon=True
    )
    relay.start()
    code = _wait(torchrun, stopping, signal_ranks)
    relay.join(timeout=5.0)  # the ranks' last lines, before the launcher's own
    return code


def _wait(
    torchrun: subprocess.Popen, stopping: threading.Event, signal_ranks: Callable[[], None]
) -> int:
    """torchrun's exit code; once ``stopping`` is set, the ranks have GRACE_S to stop."""
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
        with contextlib.suppress(OSError):
            print("launch: the ranks did not stop in time; stopping torchrun", file=sys.stderr)
        torchrun.terminate()
        try:
            # torchrun itself gives its ranks 30 s after a SIGTERM before it kills them.
            return torchrun.wait(timeout=40)
        except subprocess.TimeoutExpired:
            # Each rank leads a session of its own (torchrun starts them so): kill those
            # first, then torchrun's.
            for pid in [*_children(torchrun.pid), torchrun.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            return torchrun.wait()


if __name__ == "__main__":
    sys.exit(main())
