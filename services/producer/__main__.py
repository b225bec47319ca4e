"""``python -m services.producer [--key=value ...]``: run one producer replica."""

from __future__ import annotations

import logging
import sys

from services.producer.loop import Producer
from services.producer.provider import load_provider
from shared.contract import ContractMismatch
from shared.corpus import CorpusError
from shared.exit_codes import ExitCode
from shared.faults import REFUSED, refusal_message
from shared.lifecycle import stop_on_signals
from shared.logs import configure_logging
from shared.metrics import serve as serve_metrics
from shared.settings import ProducerConfig, SettingsError, load_settings

log = logging.getLogger("services.producer")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv, service=ProducerConfig)
    except SettingsError as exc:
        print(f"producer: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    configure_logging(settings.log_level, "producer")
    log.info(
        "starting: namespace %s, redis %s, dataset %s, batch %dx%d",
        settings.namespace,
        settings.redis_url,
        settings.dataset,
        settings.batch_size,
        settings.block_size,
    )
    try:
        provider = load_provider(settings)
    except (SettingsError, CorpusError) as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG

    stop = stop_on_signals(log, "finishing the current send, then stopping")
    serve_metrics(settings.metrics_port, settings.metrics_address)
    try:
        Producer(settings, provider, stop).run()
    except ContractMismatch as exc:
        log.error("%s", exc)
        return ExitCode.CONTRACT
    except REFUSED as exc:
        log.error("%s", refusal_message(exc, "producer", settings.redis_username))
        return ExitCode.CONFIG
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
