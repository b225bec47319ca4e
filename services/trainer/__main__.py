"""``python -m services.trainer [--key=value ...]``, alone or under torchrun:
train from the Redis stream (see services/trainer/train.py)."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with producer
# processes, spinning threads slow every step down by an order of magnitude.
# (Read once, when torch loads: so before the imports below.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import sys

from services.trainer.train import Trainer
from shared.contract import ContractMismatch
from shared.lifecycle import stop_on_signals
from shared.logs import configure_logging
from shared.settings import SettingsError, load_settings

log = logging.getLogger("services.trainer")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    configure_logging(settings.log_level, f"trainer[rank{rank}]")
    stop = stop_on_signals(log, "finishing this step, checkpointing, stopping")
    try:
        trainer = Trainer(settings, stop)
    except (ContractMismatch, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 3
    try:
        result = trainer.run()
    finally:
        trainer.close()
    if rank == 0:
        log.info(
            "done at iter %d: %d entries acked (%d double), %d reclaimed, %d dead-lettered",
            result["iter_num"],
            result["acked"],
            result["double_acks"],
            result["reclaimed"],
            result["dead_letters"],
        )
        print(f"val loss {result['val_loss']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
