"""``python -m services.trainer [--key=value ...]``, alone or under torchrun:
train from the Redis stream (see services/trainer/train.py)."""

from __future__ import annotations

import os
import tempfile

# Idle OpenMP threads sleep instead of spinning. On a CPU shared with producer
# processes, spinning threads slow every step down by an order of magnitude.
# (Read once, when torch loads: so before the imports below.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _metrics_dir() -> str:
    """Every rank of one launch writes its metrics here (prometheus_client's
    multiprocess mode); local rank 0 serves them. Set before the client loads."""
    if "LOCAL_RANK" in os.environ:  # torchrun: the agent's pid is shared by its ranks
        launch = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}-{os.getppid()}"
    else:
        launch = f"pid{os.getpid()}"
    path = os.path.join(tempfile.gettempdir(), f"maskstream-metrics-{launch}")
    os.makedirs(path, exist_ok=True)
    return path


os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", _metrics_dir())

import contextlib  # noqa: E402 - after the environment above
import logging  # noqa: E402 - after the environment above
import math  # noqa: E402 - after the environment above
import sys  # noqa: E402 - after the environment above
from pathlib import Path  # noqa: E402 - after the environment above

from prometheus_client import multiprocess  # noqa: E402 - after the environment above

from services.trainer.checkpoint import (  # noqa: E402 - after the environment above
    CheckpointError,
    CheckpointWriteError,
    OutDirInUse,
    diverged_before,
    hold_out_dir,
    mark_diverged,
    remove_stale_temporaries,
    would_replace,
)
from services.trainer.guard import TrainingDiverged  # noqa: E402 - after the environment above
from services.trainer.launch import EXIT_DIR_ENV  # noqa: E402 - after the environment above
from services.trainer.train import (  # noqa: E402 - after the environment above
    StepFailed,
    Trainer,
    TrainerConfigError,
    refuse_with_peers,
    several_machines,
)
from shared.contract import ContractMismatch  # noqa: E402 - after the environment above
from shared.exit_codes import ExitCode  # noqa: E402 - after the environment above
from shared.faults import REFUSED, refusal_message  # noqa: E402 - after the environment above
from shared.lifecycle import stop_on_signals  # noqa: E402 - after the environment above
from shared.logs import configure_logging  # noqa: E402 - after the environment above
from shared.settings import (  # noqa: E402 - after the environment above
    SettingsError,
    TrainerConfig,
    load_settings,
)

log = logging.getLogger("services.trainer")


def _refused(exc: Exception, user: str | None) -> int:
    """Log why the trainer cannot go on, and the exit code that says who must act."""
    if isinstance(exc, REFUSED):
        log.error("%s", refusal_message(exc, "trainer", user))
        return ExitCode.CONFIG
    log.error("%s", exc)
    return ExitCode.CONFIG if isinstance(exc, TrainerConfigError) else ExitCode.CONTRACT


def _may_start(settings: TrainerConfig, rank: int) -> tuple[object, str | None]:
    """Before the process group: rank 0 takes out_dir's lock (returned, to be held), and every
    rank checks that starting would neither replace a checkpoint nor repeat a diverged run.
    Why not, if it may not."""
    lock = None
    if rank == 0:  # the rank that writes the checkpoint
        try:
            lock = hold_out_dir(settings.out_dir)
        except OutDirInUse as exc:
            return None, str(exc)
        except OSError as exc:  # checkpoints could not be written there either
            return (
                None,
                f"out_dir {settings.out_dir} cannot be written ({exc}): choose another --out_dir",
            )
        if freed := remove_stale_temporaries(settings.out_dir):
            log.info("removed %.1f MB of checkpoint writes a killed trainer left", freed / 1e6)
    # Every rank (rank 0 after taking the lock: a live trainer there is named as such).
    reason = would_replace(
        settings.out_dir, settings.init_from, settings.model_fields_set
    ) or diverged_before(settings.out_dir, settings)
    return lock, reason


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(argv, service=TrainerConfig)
    except SettingsError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    rank = int(os.environ.get("RANK", "0"))
    configure_logging(settings.log_level, f"trainer[rank{rank}]")
    stop = stop_on_signals(log, "finishing this step, checkpointing, stopping")
    _lock, reason = _may_start(settings, rank)  # rank 0 holds out_dir's lock while it lives
    if reason:
        log.error("%s", reason)
        if several_machines():
            # torchrun stops this machine's ranks, not the others': they would wait for
            # this one in the process group. Tell them at its first collective.
            refuse_with_peers(settings)
        return ExitCode.CONFIG
    try:
        trainer = Trainer.start(settings, stop)
    except (ContractMismatch, CheckpointError, TrainerConfigError, *REFUSED) as exc:
        return _refused(exc, settings.redis_username)
    if trainer is None:
        log.info("stopped before producers published the contract")
        return ExitCode.OK
    try:
        result = trainer.run()
    except StepFailed as exc:
        log.error("%s; exiting so that a restart goes on", exc, exc_info=exc.__cause__)
        return ExitCode.FAILURE
    except TrainingDiverged as exc:  # a setting (the learning rate, say) must change
        log.error("%s", exc)
        if rank == 0:  # a restart with the same settings would diverge again: refused
            try:
                mark_diverged(settings.out_dir, settings, exc.iter_num, str(exc))
            except OSError as err:
                log.warning("could not record the divergence in %s: %s", settings.out_dir, err)
        return ExitCode.CONFIG
    except CheckpointWriteError as exc:  # ack_policy=checkpoint: no ack without one
        log.error("%s", exc)
        return ExitCode.CONFIG
    except (ContractMismatch, *REFUSED) as exc:  # e.g. Redis came back with another contract
        return _refused(exc, settings.redis_username)
    finally:
        trainer.close()
        # This rank's "live" gauges leave the multiprocess view.
        multiprocess.mark_process_dead(os.getpid())
    if rank == 0:
        log.info(
            "done at iter %d: %d entries acked (%d double), %d reclaimed, %d dead-lettered",
            result["iter_num"],
            result["acked"],
            result["double_acks"],
            result["reclaimed"],
            result["dead_letters"],
        )
        if math.isnan(result["val_loss"]):
            print("val loss: none (stopped before the first evaluation)", flush=True)
        else:
            print(f"val loss {result['val_loss']:.4f}", flush=True)
            bound = result["bound"]
            kind = "AR NLL" if settings.objective == "ar" else "ELBO"
            print(bound.last_line(kind), flush=True)
        if not result["checkpoint_written"]:
            log.error(
                "the last checkpoint could not be written to %s (see above): the steps since "
                "the last one written are not on disk; free space there or choose another "
                "--out_dir",
                settings.out_dir,
            )
            return ExitCode.CONFIG
    return ExitCode.OK


def _report_exit(code: int) -> int:
    """Under ``services.trainer.launch``: leave this rank's exit code where the launcher
    reads it (torchrun itself exits 1 whatever code a failed rank had)."""
    where = os.environ.get(EXIT_DIR_ENV)
    if where and code:
        with contextlib.suppress(OSError):
            Path(where, f"rank{os.environ.get('RANK', '0')}").write_text(str(int(code)))
    return code


if __name__ == "__main__":
    sys.exit(_report_exit(main()))
