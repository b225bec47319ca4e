"""The trainer's Prometheus metrics (see shared/metrics.py for conventions).
Gauges use multiprocess mode "livemax": the value of live ranks, their maximum
(only the first rank sets most of them)."""

import os

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import FAST_BUCKETS, SLOW_BUCKETS

CONSUMED_BATCHES = Counter(
    "maskstream_consumed_batches", "Micro-batches trained on", ["rank", "stage"]
)
CONSUMED_TOKENS = Counter("maskstream_consumed_tokens", "Tokens trained on", ["rank"])
CONSUMED_BYTES = Counter("maskstream_consumed_bytes", "Message bytes trained on", ["rank"])
ACKED_ENTRIES = Counter("maskstream_acked_entries", "Entries acked and deleted", ["rank"])
DOUBLE_ACKS = Counter("maskstream_double_acks", "Ack attempts for entries already acked", ["rank"])
DEAD_LETTERS = Counter(
    "maskstream_dead_letters", "Entries moved to the dead-letter stream", ["reason", "rank"]
)
DEAD_LETTERS_LOST = Counter(
    "maskstream_dead_letters_lost",
    "Bad entries removed without a dead-letter record (Redis refused the record)",
    ["reason", "rank"],
)
VALIDATION_SKIPPED = Counter(
    "maskstream_validation_entries_skipped",
    "Validation entries that failed their checks and were left out of evaluation",
    ["reason"],
)
NONFINITE_STEPS = Counter(
    "maskstream_trainer_nonfinite_steps",
    "Training steps whose gradient was not finite (NaN or inf): zeroed, so the step trained "
    "on nothing",
)
STEP_FAILURES = Counter(
    "maskstream_step_failures",
    "Training steps that raised (counted against their entries)",
    ["rank"],
)
CHECKPOINT_FAILURES = Counter(
    "maskstream_trainer_checkpoint_failures",
    "Checkpoints that could not be written (full disk, unwritable out_dir); training went on",
)
REDIS_UP = Gauge(
    "maskstream_trainer_redis_up",
    "1 while Redis answers this rank, 0 while it waits out an outage or a full Redis",
    ["rank"],
    multiprocess_mode="livemin",
)
REDIS_OUTAGES = Counter(
    "maskstream_trainer_redis_outages", "Times this rank lost Redis and waited", ["rank"]
)


def redis_up(up: bool, rank: str | None = None) -> None:
    """RedisState's hook: the gauge, and one count per outage."""
    rank = rank if rank is not None else os.environ.get("RANK", "0")
    REDIS_UP.labels(rank).set(1.0 if up else 0.0)
    if not up:
        REDIS_OUTAGES.labels(rank).inc()


RECLAIMED_ENTRIES = Counter(
    "maskstream_reclaimed_entries",
    "Entries taken back at start (own pending, then idle ones of gone consumers)",
    ["rank"],
)
DATA_WAIT_SECONDS = Histogram(
    "maskstream_trainer_data_wait_seconds",
    "Time a step waited for data",
    ["rank"],
    buckets=FAST_BUCKETS,
)
STEP_SECONDS = Histogram(
    "maskstream_trainer_step_seconds",
    "Wall time of one optimizer step",
    ["rank"],
    buckets=SLOW_BUCKETS,
)
LOSS = Gauge(
    "maskstream_trainer_loss",
    "Training loss of the last logged step (every log_interval)",
    multiprocess_mode="livemax",
)
VAL_LOSS = Gauge(
    "maskstream_trainer_val_loss",
    'Validation loss of the last evaluation (stage="all": overall)',
    ["stage"],
    multiprocess_mode="livemax",
)
VAL_BITS = Gauge(
    "maskstream_trainer_val_bits_per_char",
    "Likelihood bound on the fixed validation windows in bits/char: the masked-diffusion "
    "ELBO (bound=elbo) or the autoregressive baseline's NLL (bound=ar_nll)",
    ["bound"],
    multiprocess_mode="livemax",
)
LEARNING_RATE = Gauge(
    "maskstream_trainer_learning_rate", "Learning rate", multiprocess_mode="livemax"
)
ACTIVE_STAGE = Gauge(
    "maskstream_trainer_active_stage",
    "Active training stage (-1: all)",
    multiprocess_mode="livemax",
)
ITERATION = Gauge(
    "maskstream_trainer_iteration", "Optimizer steps done", multiprocess_mode="livemax"
)
TOKENS_PER_SECOND = Gauge(
    "maskstream_trainer_tokens_per_second",
    "Tokens trained per second, all ranks",
    multiprocess_mode="livemax",
)
MFU = Gauge(
    "maskstream_trainer_mfu_ratio", "Model FLOPs utilization (0..1)", multiprocess_mode="livemax"
)
WORLD_SIZE = Gauge("maskstream_trainer_world_size", "Trainer ranks", multiprocess_mode="livemax")

# The queue, as the trainer sees it (rank 0 polls Redis): right whatever the
# number of producers, zero included.
STREAM_LENGTH = Gauge(
    "maskstream_stream_length", "Entries in the stream", ["stream"], multiprocess_mode="livemax"
)
GROUP_PENDING = Gauge(
    "maskstream_group_pending",
    "Entries delivered to the group's consumers and not acked",
    ["stream", "group"],
    multiprocess_mode="livemax",
)
GROUP_LAG = Gauge(
    "maskstream_group_lag",
    "Entries not yet delivered to the group (stream length minus pending)",
    ["stream", "group"],
    multiprocess_mode="livemax",
)
MAX_BACKLOG = Gauge("maskstream_max_backlog", "Configured max_backlog", multiprocess_mode="livemax")
