"""What the autoscaler measures before each decision.

Rates and the trainers' data-wait share come from Prometheus: they need time
windows, and the trainers publish their wait only as metrics. The queue length
comes from Redis itself (XLEN): exact and current, and right whatever the
number of producers, zero included. The producer count comes from the engine.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request

import redis

from services.autoscaler.policy import Signals


class PrometheusError(RuntimeError):
    """Prometheus is unreachable or refused a query."""


def prometheus_scalar(base_url: str, expr: str, timeout: float = 5.0) -> float:
    """The single value of ``expr`` (summed if several series); NaN when empty."""
    url = f"{base_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            answer = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PrometheusError(f"{base_url}: {exc}") from exc
    if answer.get("status") != "success":
        raise PrometheusError(f"{expr}: {answer.get('error')}")
    values = [float(series["value"][1]) for series in answer["data"]["result"]]
    return sum(values) if values else math.nan


def queries(window: str) -> dict[str, str]:
    return {
        "wait": f"sum(rate(maskstream_trainer_data_wait_seconds_sum[{window}]))",
        "step": f"sum(rate(maskstream_trainer_step_seconds_sum[{window}]))",
        "consumed": f"sum(rate(maskstream_consumed_batches_total[{window}]))",
        "produced": f'sum(rate(maskstream_produced_batches_total{{split="train"}}[{window}]))',
        "backpressure": f"sum(rate(maskstream_producer_backpressure_wait_seconds_sum[{window}]))",
        "producers_up": 'count(up{job="producer"} == 1)',
        "trainers_up": 'count(up{job="trainer"} == 1)',
    }


def read_signals(
    prometheus_url: str,
    client: redis.Redis,
    stream: str,
    *,
    producers: int,
    max_backlog: int,
    window: str,
) -> Signals:
    values = {name: prometheus_scalar(prometheus_url, q) for name, q in queries(window).items()}
    queue_length = int(client.xlen(stream))
    wait_share = values["wait"] / values["step"] if values["step"] > 0 else math.nan
    if math.isnan(wait_share) and values["trainers_up"] > 0 and queue_length == 0:
        # Trainers that finish no step at all and find the queue empty are
        # waiting all the time: their wait never shows up as a completed step.
        wait_share = 1.0
    consumed = values["consumed"]
    if not values["trainers_up"] > 0:  # NaN (no target up) or 0
        # No trainer answers its scrape (none running, paused, stopped): no demand to measure.
        # Their last series go stale within the window and would leave the policy holding
        # (no_signal) while producers fill a queue nobody reads. Zero demand and zero wait are
        # never a reason to scale up; down only when Redis shows the queue full and the
        # producers waiting on backpressure.
        consumed, wait_share = 0.0, 0.0
    scraped = values["producers_up"]
    backpressure = values["backpressure"] / scraped if scraped > 0 else math.nan
    return Signals(
        time_s=time.monotonic(),
        producers=producers,
        data_wait_share=wait_share,
        consumed_per_s=consumed,
        produced_per_s=0.0 if producers == 0 else values["produced"],
        queue_length=queue_length,
        max_backlog=max_backlog,
        backpressure_share=backpressure,
    )
