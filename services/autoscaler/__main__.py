"""``python -m services.autoscaler [--key=value ...]``: keep trainers fed with
the fewest producer replicas.

Every ``autoscale_interval_s`` it reads the signals (services/autoscaler/
signals.py), asks the pure policy (policy.py) for a producer count, and applies
it through the container engine (engine.py), unless ``dry_run``.
"""

from __future__ import annotations

import logging
import math
import sys

from services.autoscaler import metrics
from services.autoscaler.engine import EngineError, Replicas, connect_engine, own_project
from services.autoscaler.policy import CHANGES, PolicyConfig, PolicyState, decide
from services.autoscaler.signals import PrometheusError, prometheus_scalar, read_signals
from shared.exit_codes import ExitCode
from shared.faults import REFUSED, refusal_message
from shared.lifecycle import stop_on_signals
from shared.logs import configure_logging
from shared.metrics import serve as serve_metrics
from shared.settings import AutoscalerConfig, SettingsError, load_settings
from shared.streams import TRANSIENT_ERRORS, StreamKeys, client_for

log = logging.getLogger("services.autoscaler")


def policy_config(s: AutoscalerConfig) -> PolicyConfig:
    return PolicyConfig(
        min_producers=s.min_producers,
        max_producers=s.max_producers,
        starve_threshold=s.starve_threshold,
        full_fraction=s.full_fraction,
        idle_backpressure=s.idle_backpressure,
        cooldown_s=s.cooldown_s,
        headroom=s.headroom,
        confirm=s.confirm,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv, service=AutoscalerConfig)
        config = policy_config(settings)
    except (SettingsError, ValueError) as exc:
        print(f"autoscaler: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    configure_logging(settings.log_level, "autoscaler")
    replicas: Replicas | None = None
    try:
        engine = connect_engine()
    except EngineError as exc:
        if not settings.dry_run:
            log.error("%s", exc)
            return ExitCode.CONFIG
        # A dry run can still watch: it counts the producers Prometheus scrapes.
        log.warning("%s; dry run: counting producers from Prometheus instead", exc)
    else:
        project = settings.compose_project or own_project(engine)
        if not project:
            log.error("compose_project is unset and this process is not in a compose container")
            return ExitCode.CONFIG
        replicas = Replicas(engine, project, settings.producer_service, settings.stop_timeout_s)
    client = client_for(settings)
    keys = StreamKeys(settings.namespace)
    try:  # credentials and the one permission it needs, checked before anything else
        client.xlen(keys.train)
    except REFUSED as exc:
        log.error("%s", refusal_message(exc, "autoscaler", settings.redis_username))
        return ExitCode.CONFIG
    except TRANSIENT_ERRORS as exc:
        log.warning("Redis unavailable at start (%s); the loop keeps trying", exc)
    stop = stop_on_signals(log, "stopping after this decision")
    serve_metrics(settings.autoscaler_metrics_port, settings.metrics_address)
    log.info(
        "scaling %s within [%d, %d]%s, every %.0f s",
        settings.producer_service,
        config.min_producers,
        config.max_producers,
        " (dry run)" if settings.dry_run else "",
        settings.autoscale_interval_s,
    )
    state = PolicyState()
    while not stop.is_set():
        try:
            if replicas is not None:
                running = len(replicas.running())
            else:
                scraped = prometheus_scalar(
                    settings.prometheus_url, 'count(up{job="producer"} == 1)'
                )
                running = 0 if math.isnan(scraped) else int(scraped)
            signals = read_signals(
                settings.prometheus_url,
                client,
                keys.train,
                producers=running,
                max_backlog=settings.max_backlog,
                window=settings.rate_window,
            )
        except REFUSED as exc:  # before TRANSIENT_ERRORS: a refused login is a ConnectionError
            log.error("%s", refusal_message(exc, "autoscaler", settings.redis_username))
            return ExitCode.CONFIG
        except (PrometheusError, EngineError, *TRANSIENT_ERRORS) as exc:
            metrics.ERRORS.labels("observe").inc()
            log.warning("cannot observe (%s); trying again", exc)
            stop.wait(settings.autoscale_interval_s)
            continue
        decision = decide(signals, config, state)
        state = decision.state
        metrics.DECISIONS.labels(decision.reason).inc()
        metrics.ACTUAL.set(running)
        metrics.DESIRED.set(decision.desired)
        for name in ("data_wait_share", "consumed_per_s", "produced_per_s", "backpressure_share"):
            value = getattr(signals, name)
            metrics.SIGNAL.labels(name).set(value if not math.isnan(value) else -1)
        metrics.SIGNAL.labels("queue_fill").set(signals.queue_length / settings.max_backlog)
        if decision.desired != running and decision.reason in CHANGES:
            log.info(
                "%s: %d -> %d producers (wait %.1f%%, consumed %.1f/s, produced %.1f/s, "
                "queue %d/%d, backpressure %.0f%%)%s",
                decision.reason,
                running,
                decision.desired,
                100 * signals.data_wait_share,
                signals.consumed_per_s,
                signals.produced_per_s,
                signals.queue_length,
                settings.max_backlog,
                100 * signals.backpressure_share,
                " [dry run]" if settings.dry_run else "",
            )
            if not settings.dry_run:
                try:
                    change = replicas.scale_to(decision.desired)
                    metrics.CHANGES.labels("up" if change > 0 else "down").inc(abs(change))
                except (EngineError, OSError) as exc:
                    metrics.ERRORS.labels("apply").inc()
                    log.error("could not scale: %s", exc)
        stop.wait(settings.autoscale_interval_s)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
