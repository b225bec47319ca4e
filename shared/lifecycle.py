"""Process lifecycle shared by the services' entry points."""

from __future__ import annotations

import logging
import signal
import threading


def stop_on_signals(log: logging.Logger, what_happens: str) -> threading.Event:
    """An event set by SIGTERM or SIGINT, which the service's loop watches to
    stop cleanly; ``what_happens`` tells the log what the service does then."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("%s received: %s", signal.Signals(signum).name, what_happens)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop
