"""Reading batches back: a consumer-group member that checks every entry
completely (shared/validation.py), dead-letters the ones nobody may train on,
enforces the delivery limit, and acks-and-deletes on request; plus the
non-destructive read of the fixed validation set."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable

import redis

from shared.codec import Batch, CodecError
from shared.contract import check_meta, read_meta
from shared.streams import (
    Entry,
    StreamKeys,
    ack_and_delete,
    dead_letter,
    ensure_group,
    keep_repeated_fields,
    read_new,
    reclaim,
)
from shared.validation import EntryValidator

log = logging.getLogger(__name__)

Delivered = tuple[bytes, Batch]


def _checked(validator: EntryValidator, fields: dict[bytes, bytes]) -> Batch:
    """The validator's verdict; any unexpected exception inside a check is
    turned into an ``internal_error`` refusal, never raised past here."""
    try:
        return validator.check(fields)
    except CodecError:
        raise
    except Exception as exc:  # a bug or a resource limit in a check: refuse the entry
        raise CodecError("internal_error", f"{type(exc).__name__}: {str(exc)[:300]}") from exc


class BatchReader:
    """One consumer of ``group`` on the training stream.

    Delivery limit: a training step that fails records its entries in the
    group's failures hash (:meth:`record_failure`). An entry reclaimed after
    ``max_deliveries`` such failures is dead-lettered (``delivery_limit``)
    instead of being handed to a step again. Only failed steps count, so
    restarts of a healthy trainer, which deliver the same valid entries again,
    never dead-letter them."""

    def __init__(
        self,
        client: redis.Redis,
        keys: StreamKeys,
        group: str,
        consumer: str,
        *,
        validator: EntryValidator,
        dead_letter_maxlen: int,
        max_deliveries: int = 3,
        on_dead_letter: Callable[[str], None] | None = None,
        on_dead_letter_lost: Callable[[str], None] | None = None,
    ) -> None:
        # Whoever built the client, a field name given twice must reach the checks.
        client = keep_repeated_fields(client)
        self.client, self.keys, self.group, self.consumer = client, keys, group, consumer
        self.validator = validator
        self.on_dead_letter = on_dead_letter
        self.on_dead_letter_lost = on_dead_letter_lost
        self.stream = keys.train
        self.failures_key = keys.failures(group)
        self.dead_letter_maxlen = dead_letter_maxlen
        self.max_deliveries = max_deliveries
        self.dead_letters: Counter[str] = Counter()
        self.dead_letters_lost = 0

    def setup(self, start_id: str = "0") -> None:
        ensure_group(self.client, self.stream, self.group, start_id)

    def reclaim(self, min_idle_ms: int, exclude: set[bytes] = frozenset()) -> list[Delivered]:
        """This consumer's own pending entries, then idle ones of others, less
        ``exclude`` (entries this consumer already handed to training); entries
        past the delivery limit are dead-lettered here."""
        entries = [
            entry
            for entry in reclaim(self.client, self.stream, self.group, self.consumer, min_idle_ms)
            if entry[0] not in exclude
        ]
        return self._usable(self._within_delivery_limit(entries))

    def reclaim_departed(self, live: set[str]) -> list[Delivered]:
        """Entries pending on consumers that are not in ``live`` (ranks of an
        earlier, larger world, or gone), claimed for this consumer; consumers
        left with nothing pending are removed from the group. Live consumers'
        entries are never touched, however long they hold them."""
        claimed: list[Entry] = []
        for consumer in self.client.xinfo_consumers(self.stream, self.group):
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name in live or name == self.consumer:
                continue
            if int(consumer["pending"]) == 0:
                # Nothing pending: removing it loses nothing (DELCONSUMER drops
                # a consumer's pending entries, so never before they are claimed).
                self.client.xgroup_delconsumer(self.stream, self.group, name)
                continue
            pending = self.client.xpending_range(
                self.stream, self.group, "-", "+", 1000, consumername=name
            )
            ids = [entry["message_id"] for entry in pending]
            if ids:
                entries = self.client.xclaim(self.stream, self.group, self.consumer, 0, ids)
                claimed.extend(entries)
                log.info("%s: took %d entries left pending by %s", self.consumer, len(ids), name)
        return self._usable(self._within_delivery_limit(claimed))

    def reclaim_orphans(self, handed: set[bytes]) -> list[Delivered]:
        """Entries in this consumer's own pending list that it never received, less
        ``handed`` (those it did hand to training and has not acked yet).

        A read whose reply is lost on the wire after Redis ran it (a reset connection,
        which the client's own retry hides) leaves entries delivered to this consumer
        that nobody holds: no other consumer may take them while it lives, so they would
        wait for its restart. ``handed`` must be read before this call, so an entry
        acked meanwhile is either in it or no longer pending."""
        ids: list[bytes] = []
        start = "-"
        while page := self.client.xpending_range(
            self.stream, self.group, start, "+", 1000, consumername=self.consumer
        ):  # every page: a rank may hold far more than 1000 (ack_policy=checkpoint)
            ids += [row["message_id"] for row in page if row["message_id"] not in handed]
            start = "(" + page[-1]["message_id"].decode()
        if not ids:
            return []
        entries = self.client.xclaim(self.stream, self.group, self.consumer, 0, ids)
        named = {entry_id for entry_id, _ in entries if entry_id is not None}
        # Deleted meanwhile (Redis 6.2's XCLAIM leaves them out): nothing to train on.
        entries += [(entry_id, {}) for entry_id in ids if entry_id not in named]
        return self._usable(self._within_delivery_limit(entries))

    def recover(self) -> bool:
        """After Redis lost the group (a restart without persistence): re-create
        it once producers have restored the contract; False while the contract
        is missing. Raises ``ContractMismatch`` if Redis now holds another one."""
        stored = read_meta(self.client, self.keys)
        if stored is None:
            return False
        check_meta(self.keys, stored, self.validator.meta)
        self.setup("0")
        return True

    def read(self, count: int, block_ms: int | None) -> list[Delivered]:
        entries = read_new(self.client, self.stream, self.group, self.consumer, count, block_ms)
        return self._usable(entries)  # never delivered before: no failures to look up

    def ack(self, ids: list[bytes]) -> int:
        return ack_and_delete(self.client, self.stream, self.group, ids, self.failures_key)

    def record_failure(self, ids: list[bytes]) -> None:
        """A training step failed while it held ``ids``: count it against each."""
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hincrby(self.failures_key, entry_id, 1)
        pipe.execute()

    # ------------------------------------------------------------- checks

    def _within_delivery_limit(self, entries: list[Entry]) -> list[Entry]:
        named = [entry for entry in entries if entry[1]]
        if not named:
            return entries
        counts = self.client.hmget(self.failures_key, [entry_id for entry_id, _ in named])
        failed = {
            entry_id: int(count)
            for (entry_id, _), count in zip(named, counts, strict=True)
            if count is not None and count.isdigit() and int(count) >= self.max_deliveries
        }
        if not failed:
            return entries
        kept = []
        for entry_id, fields in entries:
            if entry_id not in failed:
                kept.append((entry_id, fields))
                continue
            # XPENDING's extended form knows how often Redis delivered it.
            info = self.client.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
            delivered = info[0]["times_delivered"] if info else "?"
            refusal = CodecError(
                "delivery_limit",
                f"{failed[entry_id]} training steps failed on it (max_deliveries="
                f"{self.max_deliveries}); delivered {delivered} times",
            )
            try:  # name its producer and seq in the record when it decodes
                batch = _checked(self.validator, fields)
                refusal.producer, refusal.seq = batch.producer, batch.seq
            except CodecError:
                pass
            self._dead_letter(entry_id, fields, refusal)
            self.client.hdel(self.failures_key, entry_id)
        return kept

    def _usable(self, entries: Iterable[Entry]) -> list[Delivered]:
        out: list[Delivered] = []
        gone: list[bytes] = []
        for entry_id, fields in entries:
            if entry_id is None:  # Redis 6.2's XCLAIM of a deleted entry: nothing to use
                continue
            if not fields:  # deleted after delivery (acked elsewhere): just clear it
                gone.append(entry_id)
                continue
            try:
                batch = _checked(self.validator, fields)
            except CodecError as exc:
                self._dead_letter(entry_id, fields, exc)
                continue
            out.append((entry_id, batch))
        if gone:
            self.client.xack(self.stream, self.group, *gone)
        return out

    def _dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], exc: CodecError) -> None:
        self.dead_letters[exc.reason] += 1
        if self.on_dead_letter is not None:
            self.on_dead_letter(exc.reason)
        stored = dead_letter(
            self.client,
            self.keys,
            source=self.stream,
            entry_id=entry_id,
            fields=fields,
            reason=exc.reason,
            detail=exc.detail,
            maxlen=self.dead_letter_maxlen,
            group=self.group,
            producer=exc.producer,
            seq=exc.seq,
        )
        if not stored:
            self.dead_letters_lost += 1
            if self.on_dead_letter_lost is not None:
                self.on_dead_letter_lost(exc.reason)


def validation_ready(client: redis.Redis, keys: StreamKeys, fingerprint: str) -> bool:
    return client.get(keys.val_done) == fingerprint.encode()


def read_validation(
    client: redis.Redis,
    keys: StreamKeys,
    validator: EntryValidator,
    on_bad: Callable[[str], None] | None = None,
) -> list[Batch]:
    """The fixed validation set, in order, read without consuming it. Call once
    :func:`validation_ready` is true. A bad entry is skipped with a log line
    (and ``on_bad(reason)``): the set is the producers' to repair, and an
    evaluation on the rest is still the same for every run."""
    batches = []
    for entry_id, fields in keep_repeated_fields(client).xrange(keys.val):
        try:
            batches.append(_checked(validator, fields))
        except CodecError as exc:
            log.error(
                "skipping validation entry %s of %s: %s (%s)",
                entry_id.decode(errors="replace"),
                keys.val,
                exc.reason,
                exc.detail[:200],
            )
            if on_bad is not None:
                on_bad(exc.reason)
    return batches
