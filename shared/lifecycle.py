"""Process lifecycle shared by the services' entry points."""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """For ``Popen(preexec_fn=...)``: the child gets SIGTERM when the process that
    started it dies, even by SIGKILL, so that a supervisor killed outright leaves
    nothing running (Linux; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child ``python -m services...``: the
    repository first on the import path, then whatever PYTHONPATH already held
    (packages installed with ``pip --target``, say), and ``extra`` on top."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def stop_on_signals(log: logging.Logger, what_happens: str) -> threading.Event:
    """An event set by SIGTERM or SIGINT, which the service's loop watches to
    stop cleanly; ``what_happens`` tells the log what the service does then.
    SIGUSR1 prints every thread's stack to stderr and changes nothing else: how
    to see where a service that does not stop is stuck (``kill -USR1 PID``)."""
    stop = threading.Event()
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)

    def request_stop(signum: int, _frame: object) -> None:
        log.info("%s received: %s", signal.Signals(signum).name, what_happens)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop
