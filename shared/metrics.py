"""Serving Prometheus metrics. The metrics are defined in
services/producer/metrics.py and services/trainer/metrics.py: base units,
``_total`` for counters (the client adds it), ``_seconds`` and ``_bytes``.

Producers serve their own registry on ``metrics_port``. Trainer ranks run in
prometheus_client's multiprocess mode: every rank writes its values to files
in ``PROMETHEUS_MULTIPROC_DIR`` and local rank 0 serves them all on
``trainer_metrics_port``, so each trainer container is one scrape target
whatever its number of GPUs. Per-rank series carry a ``rank`` label.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

# Histogram buckets (seconds) for per-batch and per-step times.
FAST_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
SLOW_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# Where metrics servers listen unless told: loopback, so a native run exposes nothing.
# Containers set METRICS_ADDRESS=0.0.0.0 (the stack's own network, no host port).
METRICS_ADDRESS_ENV = "METRICS_ADDRESS"
DEFAULT_METRICS_ADDRESS = "127.0.0.1"


def serve(port: int, address: str | None = None) -> bool:
    """Serve this process's metrics, or (multiprocess mode) every rank's, on ``address``
    (None: the metrics_address setting's variable METRICS_ADDRESS, else loopback).
    A port in use (several processes on one host) is logged, not fatal."""
    if port <= 0:
        return False
    if address is None:
        address = os.environ.get(METRICS_ADDRESS_ENV) or DEFAULT_METRICS_ADDRESS
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    try:
        if directory:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            start_http_server(port, addr=address, registry=registry)
        else:
            start_http_server(port, addr=address)
    except OSError as exc:
        log.warning("no metrics: %s:%d unavailable (%s); set another port", address, port, exc)
        return False
    log.info("metrics on %s:%d/metrics", address, port)
    return True
