"""The producer's Prometheus metrics (see shared/metrics.py for conventions)."""

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import FAST_BUCKETS

PRODUCED_BATCHES = Counter(
    "maskstream_produced_batches", "Batches added to a stream", ["split", "stage", "producer"]
)
PRODUCED_TOKENS = Counter(
    "maskstream_produced_tokens", "Tokens in batches added to a stream", ["split", "producer"]
)
PRODUCED_BYTES = Counter(
    "maskstream_produced_bytes", "Message bytes added to a stream", ["split", "producer"]
)
MASK_SECONDS = Histogram(
    "maskstream_producer_mask_seconds", "Time to sample and mask one batch", buckets=FAST_BUCKETS
)
ENCODE_SECONDS = Histogram(
    "maskstream_producer_encode_seconds", "Time to encode one batch", buckets=FAST_BUCKETS
)
SEND_SECONDS = Histogram(
    "maskstream_producer_send_seconds",
    "Time of one send (reservation and MULTI)",
    buckets=FAST_BUCKETS,
)
REDIS_FULL = Counter(
    "maskstream_producer_redis_full",
    "Sends Redis refused at maxmemory (waited out as backpressure)",
)
BACKPRESSURE_SECONDS = Histogram(
    "maskstream_producer_backpressure_wait_seconds",
    "Time waited because the stream was at max_backlog, per wait",
    buckets=FAST_BUCKETS,
)
PRODUCER_STAGE = Gauge(
    "maskstream_producer_active_stage", "Stage the producer makes (-1: all)", ["producer"]
)
PRODUCER_RATE_LIMIT = Gauge(
    "maskstream_producer_rate_limit", "Configured batches/s limit (0: none)", ["producer"]
)
