"""Feeding one trainer rank from the training stream.

Each rank is a consumer (``rank<r>``) of the run's consumer group. A thread
reads ahead: first the entries this consumer left pending (a restart), then
entries idle in gone consumers' pending lists, then new ones; it decodes them
(bad ones go to the dead-letter stream), copies them into (pinned) host
tensors and queues them, so decoding and copying overlap the training step.
The training loop takes micro-batches with :meth:`StreamFeed.next` and hands
them to :meth:`StreamFeed.ack` when the step that used them is safe; a second
thread sends the XACKs (several steps' at once when they queue up), so acks
never hold up the thread that launches the steps.
:meth:`StreamFeed.flush` waits until everything handed over is acked.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis
import torch

from services.trainer import metrics
from shared.codec import Batch
from shared.faults import PASSING, REFUSED, RedisState, is_missing_group, ride_out
from shared.reader import BatchReader
from shared.streams import Backoff

log = logging.getLogger(__name__)

DEPARTED_SWEEP_S = 10.0  # how often the first rank looks for entries of departed ranks
ORPHAN_SWEEP_S = 10.0  # how often a rank looks for entries delivered to it that it never got


@dataclass(frozen=True)
class MicroBatch:
    entry_id: bytes
    producer: int
    seq: int
    stage: int
    inputs: torch.Tensor  # (B, T) token ids, uint8 or int32, on the host
    labels: torch.Tensor  # (B, T), the wire's "ignore" sentinel where unselected
    mask_ratio: torch.Tensor | None = None  # (B,) float32, when the contract carries it


def to_host_tensor(array: np.ndarray, pin: bool) -> torch.Tensor:
    """A host copy of a (read-only) wire array; uint16/uint32 widen to int32,
    which torch handles everywhere."""
    if array.dtype != np.uint8:
        array = array.astype(np.int32)
    dtype = torch.uint8 if array.dtype == np.uint8 else torch.int32
    tensor = torch.empty(array.shape, dtype=dtype, pin_memory=pin)
    tensor.numpy()[...] = array
    return tensor


class StreamFeed:
    def __init__(
        self,
        reader: BatchReader,
        *,
        prefetch: int,
        reclaim_idle_ms: int,
        pin_memory: bool,
        ack_log: Path | None = None,
        world: int = 1,
        stop: threading.Event | None = None,
        redis_state: RedisState | None = None,
    ) -> None:
        self.reader = reader
        self.world = world
        # The trainer's stop: acks give up waiting for Redis once it is set.
        self.trainer_stop = stop or threading.Event()
        self.redis = redis_state or RedisState(reader.consumer)
        self.consumer = reader.consumer
        self.rank = reader.consumer.removeprefix("rank")
        reader.on_dead_letter = lambda reason: metrics.DEAD_LETTERS.labels(reason, self.rank).inc()
        reader.on_dead_letter_lost = lambda reason: metrics.DEAD_LETTERS_LOST.labels(
            reason, self.rank
        ).inc()
        self.prefetch, self.reclaim_idle_ms, self.pin = prefetch, reclaim_idle_ms, pin_memory
        self._queue: queue.Queue[MicroBatch | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"feed-{self.consumer}", daemon=True)
        # Entries handed to training and not acked yet. After a Redis error the
        # thread re-reads its own pending list (a reply lost in a blip leaves
        # delivered entries nobody holds) and skips these.
        self._handed: set[bytes] = set()
        self._handed_lock = threading.Lock()
        self._audit: dict[bytes, tuple[int, int]] = {}  # entry -> (producer, seq), for ack_log
        if ack_log is not None:
            ack_log.parent.mkdir(parents=True, exist_ok=True)
        self._ack_log = open(ack_log, "a", buffering=1) if ack_log else None  # noqa: SIM115
        self.reclaimed = 0
        self.acked = 0
        self.double_acks = 0
        self.wait_s = 0.0
        # The acker: ack() queues, the thread sends. Guarded by _ack_cond.
        self._ack_cond = threading.Condition()
        self._ack_backlog: list[list[bytes]] = []
        self._ack_busy = False  # the thread is sending what it took from the backlog
        self._ack_closing = False
        self._ack_error: BaseException | None = None
        self._acker: threading.Thread | None = None

    # ---------------------------------------------------------- the thread

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = Backoff(cap=2.0)
        joined = reclaimed = False
        next_sweep = time.monotonic() + DEPARTED_SWEEP_S
        next_orphans = time.monotonic() + ORPHAN_SWEEP_S
        # The first rank takes over what ranks outside this world left pending.
        live = {f"rank{r}" for r in range(self.world)} if self.consumer == "rank0" else None
        while not self._stop.is_set():
            try:
                if not joined:
                    # Here, not in start(): a full Redis refuses XGROUP CREATE
                    # until acks free memory, and that must be waited out too.
                    self.reader.setup(start_id="0")
                    joined = True
                    continue
                if not reclaimed:
                    with self._handed_lock:
                        handed = set(self._handed)
                    delivered = self.reader.reclaim(self.reclaim_idle_ms, exclude=handed)
                    self._count_reclaimed(delivered)
                    reclaimed = True
                elif live is not None and time.monotonic() >= next_sweep:
                    delivered = self.reader.reclaim_departed(live)
                    self._count_reclaimed(delivered)
                    next_sweep = time.monotonic() + DEPARTED_SWEEP_S
                elif time.monotonic() >= next_orphans:
                    with self._handed_lock:
                        handed = set(self._handed)  # before reading the pending list
                    delivered = self.reader.reclaim_orphans(handed)
                    if delivered:
                        log.warning(
                            "%s: %d entries delivered to this consumer never reached it (a "
                            "reply lost on the wire): taking them again",
                            self.consumer,
                            len(delivered),
                        )
                    self._count_reclaimed(delivered)
                    next_orphans = time.monotonic() + ORPHAN_SWEEP_S
                else:
                    delivered = self.reader.read(count=self.prefetch, block_ms=1000)
                backoff.reset()
                self.redis.recovered()
            except REFUSED as exc:  # credentials or permissions: a human must act
                self._put(exc)
                return
            except PASSING as exc:
                self.redis.failed(exc)
                reclaimed = False  # whatever a lost reply delivered is in our pending list
                self._stop.wait(backoff.next_delay())
                continue
            except redis.ResponseError as exc:
                if not is_missing_group(exc):
                    self._put(exc)
                    return
                # Redis restarted without persistence: the group is gone with the
                # data. Wait for the producers to restore the same contract.
                self.redis.failed(exc)
                try:
                    restored = self.reader.recover()
                except Exception as error:  # another contract, or a refusal
                    self._put(error)
                    return
                if restored:
                    log.warning("%s: Redis lost the consumer group; re-created it", self.consumer)
                    reclaimed = False
                else:
                    self._stop.wait(backoff.next_delay())
                continue
            except BaseException as exc:  # surfaced to the training loop by next()
                self._put(exc)
                return
            for entry_id, batch in delivered:
                with self._handed_lock:
                    if entry_id in self._handed:
                        # Delivered again while its step is under way: a group re-created
                        # from id 0 (XGROUP DESTROY, a Redis restart) serves it anew. The
                        # step's ack covers it; training on it twice would not.
                        continue
                    self._handed.add(entry_id)
                self._put(self._host_batch(entry_id, batch))

    def _count_reclaimed(self, delivered: list) -> None:
        self.reclaimed += len(delivered)
        metrics.RECLAIMED_ENTRIES.labels(self.rank).inc(len(delivered))
        if delivered:
            log.info("%s: %d entries reclaimed", self.consumer, len(delivered))

    def _host_batch(self, entry_id: bytes, batch: Batch) -> MicroBatch:
        return MicroBatch(
            entry_id=entry_id,
            producer=batch.producer,
            seq=batch.seq,
            stage=batch.stage,
            inputs=to_host_tensor(batch.tensors["input"], self.pin),
            labels=to_host_tensor(batch.tensors["labels"], self.pin),
            mask_ratio=(
                torch.from_numpy(batch.tensors["mask_ratio"].copy())
                if "mask_ratio" in batch.tensors
                else None
            ),
        )

    def _put(self, item: MicroBatch | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    # ------------------------------------------------------ the train loop

    def next(self, stop: threading.Event | None = None) -> MicroBatch | None:
        """The next micro-batch; blocks while the stream is empty (the time is
        counted in ``wait_s``). None once ``stop`` is set."""
        if stop is not None and stop.is_set():
            return None
        started = time.perf_counter()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.5)
                    break
                except queue.Empty:
                    if stop is not None and stop.is_set():
                        return None
                    if not self._thread.is_alive():
                        raise RuntimeError(f"{self.consumer}: the stream reader stopped") from None
        finally:
            self.wait_s += time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        if self._ack_log is not None:
            self._audit[item.entry_id] = (item.producer, item.seq)
        return item

    def ack(self, entry_ids: list[bytes]) -> None:
        """Queue ``entry_ids`` for XACK and XDEL, which the acker thread sends
        without holding up the caller. An id acked before (by anyone) counts in
        ``double_acks``. Raises what stopped the acker, if anything did."""
        self._raise_ack_error()
        if not entry_ids:
            return
        with self._ack_cond:
            if self._ack_closing:
                raise RuntimeError(f"{self.consumer}: ack() after close()")
            if self._acker is None:
                self._acker = threading.Thread(
                    target=self._ack_loop, name=f"ack-{self.consumer}", daemon=True
                )
                self._acker.start()
            self._ack_backlog.append(list(entry_ids))
            self._ack_cond.notify_all()

    def flush(self) -> None:
        """Wait until every id given to :meth:`ack` is acked (or left unacked
        because the trainer is stopping while Redis is away)."""
        with self._ack_cond:
            while (self._ack_backlog or self._ack_busy) and self._ack_error is None:
                self._ack_cond.wait(timeout=0.5)
        self._raise_ack_error()

    def _raise_ack_error(self) -> None:
        """Raise, in the training loop, what stopped the acker (refused
        credentials, say): the same exception, so the exit code is the same."""
        if self._ack_error is not None:
            raise self._ack_error

    def _ack_loop(self) -> None:
        while True:
            with self._ack_cond:
                while not self._ack_backlog and not self._ack_closing:
                    self._ack_cond.wait()
                if not self._ack_backlog:
                    return  # closing, and nothing left to send
                taken, self._ack_backlog = self._ack_backlog, []
                self._ack_busy = True
            error = None
            try:
                self._send_acks([entry_id for ids in taken for entry_id in ids])
            except BaseException as exc:  # raised to the training loop by ack() and flush()
                error = exc
            with self._ack_cond:
                self._ack_busy = False
                self._ack_error = error
                self._ack_cond.notify_all()
            if error is not None:
                return

    def _send_acks(self, entry_ids: list[bytes]) -> None:
        # Stopping while Redis is known to be away: do not try (a frozen Redis
        # takes a socket timeout per try) and let the trainer stop in its grace period.
        gone = self.trainer_stop.is_set() and not self.redis.up
        acked = (
            None
            if gone
            else ride_out(lambda: self.reader.ack(entry_ids), self.trainer_stop, self.redis)
        )
        if acked is None:
            log.warning(
                "%s: stopping while Redis is away: %d entries stay unacked and will be "
                "delivered again",
                self.consumer,
                len(entry_ids),
            )
            return
        self.acked += acked
        self.double_acks += len(entry_ids) - acked
        metrics.ACKED_ENTRIES.labels(self.rank).inc(acked)
        if acked < len(entry_ids):
            metrics.DOUBLE_ACKS.labels(self.rank).inc(len(entry_ids) - acked)
        if self._ack_log is not None:
            lines = []
            for entry_id in entry_ids:
                if (audited := self._audit.pop(entry_id, None)) is not None:
                    lines.append(f"{audited[0]} {audited[1]} {entry_id.decode()}\n")
            self._ack_log.write("".join(lines))
            os.fsync(self._ack_log.fileno())
        with self._handed_lock:
            self._handed.difference_update(entry_ids)

    def record_failure(self, entry_ids: list[bytes]) -> None:
        """The step holding ``entry_ids`` failed: count it (the delivery limit)."""
        ride_out(lambda: self.reader.record_failure(entry_ids), self.trainer_stop, self.redis)

    @property
    def dead_letters(self) -> int:
        return sum(self.reader.dead_letters.values())

    def close(self) -> None:
        """Send what is queued for acking (given up once the trainer stops while
        Redis is away), then stop both threads."""
        with self._ack_cond:
            self._ack_closing = True
            self._ack_cond.notify_all()
        if self._acker is not None:
            self._acker.join(timeout=30)
        self._stop.set()
        if self._thread.is_alive():  # a feed closed before start() has no thread
            self._thread.join(timeout=5)
        if self._acker is not None and self._acker.is_alive():
            # Redis is away and nobody asked the trainer to stop: what is left is
            # delivered again after a restart, the at-least-once rule.
            log.warning("%s: closing with acks still waiting for Redis", self.consumer)
            return  # the acker may yet write the ack log
        if self._ack_log is not None:
            self._ack_log.close()
