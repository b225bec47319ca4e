"""The producer loop: make batches, send them under backpressure, keep the
namespace's contract, validation set and producer lease alive, survive Redis
going away."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from services.producer import metrics
from services.producer.provider import Provider
from shared.codec import Batch, encode
from shared.contract import ContractGuard, check_meta, make_meta, publish_meta, read_meta
from shared.faults import FULL, REFUSED, WrongTypeError
from shared.masking import StageCycle
from shared.settings import ProducerConfig
from shared.streams import (
    TRANSIENT_ERRORS,
    Backoff,
    BoundedStream,
    ProducerLease,
    StreamKeys,
    add_unbounded,
    client_for,
    read_active_stage,
    wait_for_redis,
)

log = logging.getLogger(__name__)

SPLIT_CODE = {"train": 0, "val": 1}
_ORDER_TAG = 2  # keeps stage-order streams apart from batch streams
VAL_PRODUCER_ID = 0  # the validation set is one fixed stream, whoever writes it
LEASE_TTL_MS = 30_000
LEASE_RENEW_S = 5.0
VAL_LOCK_TTL_MS = 60_000
_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def contract_of(settings: ProducerConfig, provider: Provider) -> dict:
    """Everything a consumer must agree with to use this namespace's data."""
    return {
        "format_version": 1,
        "dataset": provider.name,
        "schema": {name: spec.to_json() for name, spec in provider.schema().items()},
        "seed": settings.seed,
        "val_batches": settings.val_batches,
        "use_all_stages_for_training": settings.use_all_stages_for_training,
        **provider.meta(),
    }


def batch_rng(seed: int, split: str, producer_id: int, seq: int) -> np.random.Generator:
    """The random stream of one batch: a pure function of its identity, so a
    batch can be regenerated, and no two producers ever share a stream."""
    return np.random.default_rng([seed, SPLIT_CODE[split], producer_id, seq])


class BatchMaker:
    """Deterministic (seed, producer id, sequence number) -> batch."""

    def __init__(
        self, provider: Provider, fingerprint: str, seed: int, producer_id: int, split: str
    ) -> None:
        self.provider, self.fingerprint = provider, fingerprint
        self.seed, self.producer_id, self.split = seed, producer_id, split
        self.cycle = StageCycle(
            provider.stage_count(split), [seed, _ORDER_TAG + SPLIT_CODE[split], producer_id]
        )

    def make(self, seq: int, stage: int | None = None) -> Batch:
        """``stage=None`` spreads batches evenly over all stages."""
        stage = self.cycle.stage_for(seq) if stage is None else stage
        rng = batch_rng(self.seed, self.split, self.producer_id, seq)
        tensors = self.provider.sample(rng, self.split, stage)
        return Batch(self.fingerprint, self.split, stage, self.producer_id, seq, tensors)


@dataclass
class IntervalStats:
    batches: int = 0
    bytes: int = 0
    backpressure_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


class Producer:
    def __init__(self, settings: ProducerConfig, provider: Provider, stop: threading.Event) -> None:
        self.settings, self.provider, self.stop = settings, provider, stop
        self.keys = StreamKeys(settings.namespace)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.meta = make_meta(contract_of(settings, provider), self.token)
        self.fingerprint: str = self.meta["fingerprint"]
        # No silent retries inside redis-py: a lost connection reaches run(). And every
        # new connection, redis-py's own reconnections included, checks (or restores) the
        # contract before it serves anything else (ContractGuard).
        self.guard = ContractGuard(self.keys, self.meta)
        self.client = client_for(settings, retries=0, on_connect=self.guard)
        self.train_stages = provider.stage_count("train")
        self.tokens_per_batch = settings.batch_size * settings.block_size
        self.lease = ProducerLease(self.client, self.keys, self.token, LEASE_TTL_MS)
        self.stream = BoundedStream(
            self.client,
            self.keys.train,
            settings.max_backlog,
            produced_key=self.keys.produced,
            reserved_key=self.keys.reserved,
        )
        self._release = self.client.register_script(_RELEASE_IF_OWNER)
        self.maker: BatchMaker | None = None
        self.seq = 0
        self.sent_total = 0
        self.active_stage = 0
        self.pending: deque[tuple[bytes, int]] = deque()  # (payload, stage), in seq order
        self._next_allowed = 0.0
        self.redis_full = False  # refused for maxmemory since the last successful send
        self.wrong_type = False  # a key of ours held another type (logged once)

    # ----------------------------------------------------------- lifecycle

    def run(self) -> None:
        """Produce until ``stop`` is set; Redis outages are waited out."""
        backoff = Backoff()
        try:
            while not self.stop.is_set():
                try:
                    if not wait_for_redis(self.client, self.stop):
                        break
                    self._setup()
                    backoff.reset()
                    self._produce()
                except REFUSED:
                    raise  # credentials or permissions: waiting will not help
                except FULL as exc:
                    # At maxmemory Redis refuses what would grow it: backpressure.
                    # Consumers' acks and deletes free memory; then we go on.
                    delay = backoff.next_delay()
                    if not self.redis_full:
                        log.warning("Redis is full (%s); backing off until it has room", exc)
                        self.redis_full = True
                    metrics.REDIS_FULL.inc()
                    started = time.monotonic()
                    self.stop.wait(delay)
                    metrics.BACKPRESSURE_SECONDS.observe(time.monotonic() - started)
                except WrongTypeError as exc:
                    # A key of ours replaced by hand (a string where the stream was): only
                    # an operator's DEL fixes it. Say so once, then retry quietly.
                    if not self.wrong_type:
                        log.error(
                            "a key of this namespace holds another kind of value (WRONGTYPE "
                            "%s); waiting until an operator deletes it (the stream %s, the "
                            "contract %s, the stage %s or the bound %s)",
                            exc,
                            self.keys.train,
                            self.keys.meta,
                            self.keys.stage,
                            self.keys.max_backlog,
                        )
                        self.wrong_type = True
                    self.stop.wait(backoff.next_delay())
                except TRANSIENT_ERRORS as exc:
                    delay = backoff.next_delay()
                    log.warning("lost Redis (%s); reconnecting in %.1f s", exc, delay)
                    self.stop.wait(delay)
        finally:
            self._shutdown()

    def _setup(self) -> None:
        """(Re)establish what this producer needs in Redis. Runs at start and
        after every reconnect: a restarted Redis may have lost everything."""
        publish_meta(self.client, self.keys, self.meta)
        # The bound, for trainers to check their ack policy against (not part
        # of the contract: it changes no data).
        # A plain SET: it also replaces a value of another type someone wrote there.
        self.client.set(self.keys.max_backlog, self.settings.max_backlog)
        if self.maker is None or not self.lease.renew():
            if self.maker is not None:
                log.warning(
                    "producer id %s was taken over; taking a new one", self.lease.producer_id
                )
            producer_id = self.lease.acquire(self.settings.producer_id, self.stop)
            if producer_id is None:  # stopped while waiting for a held id
                return
            self.maker = BatchMaker(
                self.provider, self.fingerprint, self.settings.seed, producer_id, "train"
            )
            # A fixed producer_id restarting goes on after its last batch.
            self.seq = self.stream.last_seq(producer_id) + 1
            self.pending.clear()
            metrics.PRODUCER_RATE_LIMIT.labels(str(producer_id)).set(self.settings.rate_limit)
            if self.settings.use_all_stages_for_training:
                metrics.PRODUCER_STAGE.labels(str(producer_id)).set(-1)
            log.info(
                "producer %d ready: fingerprint %s, %d training stage(s), max_backlog %d",
                producer_id,
                self.fingerprint,
                self.train_stages,
                self.settings.max_backlog,
            )
        else:
            self._rewind_to_redis()
        self.write_validation_set()
        self._poll_stage()
        self.guard.armed = True

    def _rewind_to_redis(self) -> None:
        """After a reconnect: if Redis replayed an AOF that lacks our last
        sends (a host crash loses up to a second), start again after the last
        sequence number it has, so that the lost batches are made again (a
        batch is a pure function of seed, producer and seq) instead of leaving
        a gap. A Redis that lost everything (no record of this producer) keeps
        our count: its backlog is gone, and repeating old batches would make
        duplicates of ones already trained on."""
        assert self.maker is not None
        last = self.stream.last_seq(self.maker.producer_id)
        first_unsent = self.seq - len(self.pending)
        if last >= 0 and last + 1 < first_unsent:
            log.warning(
                "Redis has batches up to seq %d only; making %d..%d again",
                last,
                last + 1,
                first_unsent - 1,
            )
            self.seq = last + 1
            self.pending.clear()

    def _shutdown(self) -> None:
        try:
            if self.pending and self.maker is not None:
                self._record_sent(self._send(), IntervalStats())
            if self.maker is not None:
                self.stream.release(self.maker.producer_id)
            if self.pending:
                first = self.seq - len(self.pending)
                log.info(
                    "dropping %d unsent batches (seq %d..%d)",
                    len(self.pending),
                    first,
                    self.seq - 1,
                )
            self.lease.release()
        except Exception as exc:  # Redis gone, full, or refusing us: nothing to tidy
            log.info("could not tidy up in Redis on shutdown (%s)", exc)
        log.info("producer %s stopped after %d batches", self.lease.producer_id, self.sent_total)
        self.client.close()

    # ----------------------------------------------------------- producing

    def _produce(self) -> None:
        s = self.settings
        stats = IntervalStats()
        next_poll = time.monotonic() + s.stage_poll_interval_s
        next_renew = time.monotonic() + LEASE_RENEW_S
        next_log = time.monotonic() + s.log_interval_s
        wait = 0.001
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_poll:
                self._poll_stage()
                next_poll = now + s.stage_poll_interval_s
            if now >= next_renew:
                self._maintain()
                next_renew = now + LEASE_RENEW_S
            if now >= next_log:
                self._log_interval(stats)
                stats = IntervalStats()
                next_log = now + s.log_interval_s
            while len(self.pending) < s.send_batch and not self.stop.is_set():
                self._throttle()
                self.pending.append(self._make_next())
            sent = self._send()
            if self.redis_full:
                log.info("Redis has room again")
                self.redis_full = False
            if self.wrong_type:
                log.info("the namespace's keys hold what they should again")
                self.wrong_type = False
            # (A new connection fails its first command, see ContractGuard.armed:
            # run() then restores this producer's state before anything is sent.)
            self._record_sent(sent, stats)
            if self.pending:  # the stream is at its bound: back off, then retry
                started = time.monotonic()
                self.stop.wait(wait)
                waited = time.monotonic() - started
                stats.backpressure_s += waited
                metrics.BACKPRESSURE_SECONDS.observe(waited)
                wait = min(wait * 2, 0.05)
            else:
                wait = 0.001

    def _send(self) -> int:
        """Offer every pending payload; returns how many the stream took."""
        assert self.maker is not None
        first_seq = self.seq - len(self.pending)
        started = time.perf_counter()
        sent = self.stream.add(
            [payload for payload, _ in self.pending], self.maker.producer_id, first_seq
        )
        metrics.SEND_SECONDS.observe(time.perf_counter() - started)
        return sent

    def _record_sent(self, sent: int, stats: IntervalStats) -> None:
        producer = str(self.lease.producer_id)
        for _ in range(sent):
            payload, stage = self.pending.popleft()
            stats.bytes += len(payload)
            metrics.PRODUCED_BATCHES.labels("train", str(stage), producer).inc()
            metrics.PRODUCED_BYTES.labels("train", producer).inc(len(payload))
        metrics.PRODUCED_TOKENS.labels("train", producer).inc(sent * self.tokens_per_batch)
        stats.batches += sent
        self.sent_total += sent

    def _make_next(self) -> tuple[bytes, int]:
        assert self.maker is not None
        stage = None if self.settings.use_all_stages_for_training else self.active_stage
        started = time.perf_counter()
        batch = self.maker.make(self.seq, stage)
        made = time.perf_counter()
        payload = encode(batch)
        metrics.MASK_SECONDS.observe(made - started)
        metrics.ENCODE_SECONDS.observe(time.perf_counter() - made)
        self.seq += 1
        return payload, batch.stage

    def _throttle(self) -> None:
        """Hold to ``rate_limit`` batches/s (a token bucket of depth one)."""
        if self.settings.rate_limit <= 0:
            return
        now = time.monotonic()
        if self._next_allowed > now:
            self.stop.wait(self._next_allowed - now)
        self._next_allowed = max(self._next_allowed, now) + 1.0 / self.settings.rate_limit

    def _poll_stage(self) -> None:
        if self.settings.use_all_stages_for_training:
            return
        stage = read_active_stage(self.client, self.keys)
        if stage >= self.train_stages:
            log.warning(
                "active stage %d out of range; using the last (%d)", stage, self.train_stages - 1
            )
            stage = self.train_stages - 1
        if stage != self.active_stage:
            log.info("following active stage %d (was %d)", stage, self.active_stage)
        self.active_stage = stage
        metrics.PRODUCER_STAGE.labels(str(self.lease.producer_id)).set(stage)

    def _maintain(self) -> None:
        """Renew the lease; notice a Redis that lost the contract or the
        validation set (a restart without persistence) and restore them."""
        stored = read_meta(self.client, self.keys)
        if stored is None or not self.lease.renew():
            log.warning("Redis lost this namespace's state; restoring it")
            self._setup()
            return
        check_meta(self.keys, stored, self.meta)
        self.write_validation_set()

    def _log_interval(self, stats: IntervalStats) -> None:
        elapsed = max(time.monotonic() - stats.started, 1e-9)
        stage = (
            f"all {self.train_stages}"
            if self.settings.use_all_stages_for_training
            else str(self.active_stage)
        )
        log.info(
            "producer %s: %.1f batches/s, %.0f tokens/s, %.2f MB/s | backlog %d/%d | "
            "stage %s | %.0f%% waiting on backpressure | %d sent",
            self.lease.producer_id,
            stats.batches / elapsed,
            stats.batches * self.tokens_per_batch / elapsed,
            stats.bytes / elapsed / 1e6,
            self.stream.backlog(),
            self.settings.max_backlog,
            stage,
            100.0 * stats.backpressure_s / elapsed,
            self.sent_total,
        )

    # ------------------------------------------------------ validation set

    def write_validation_set(self) -> bool:
        """Write the fixed validation set unless it exists; True if this call
        wrote it. The first producer takes a lock; the others skip."""
        if self.client.get(self.keys.val_done) == self.fingerprint.encode():
            return False
        if not self.client.set(self.keys.val_lock, self.token, nx=True, px=VAL_LOCK_TTL_MS):
            return False
        try:
            # Leftovers of a writer that died half-way are not a valid set.
            self.client.delete(self.keys.val)
            maker = BatchMaker(
                self.provider, self.fingerprint, self.settings.seed, VAL_PRODUCER_ID, "val"
            )
            chunk = 16
            for first in range(0, self.settings.val_batches, chunk):
                last = min(first + chunk, self.settings.val_batches)
                batches = [maker.make(i) for i in range(first, last)]
                add_unbounded(self.client, self.keys.val, [encode(b) for b in batches])
                for batch in batches:
                    metrics.PRODUCED_BATCHES.labels("val", str(batch.stage), "val").inc()
                self.client.pexpire(self.keys.val_lock, VAL_LOCK_TTL_MS)
            self.client.set(self.keys.val_done, self.fingerprint)
            log.info(
                "wrote the validation set: %d batches to %s",
                self.settings.val_batches,
                self.keys.val,
            )
            return True
        finally:
            self._release(keys=[self.keys.val_lock], args=[self.token])
