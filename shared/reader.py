"""Reading batches back: a consumer-group member that decodes entries,
dead-letters the ones nobody may train on, and acks-and-deletes on request;
plus the non-destructive read of the fixed validation set."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable

import redis

from shared.codec import Batch, CodecError, TensorSpec, decode
from shared.streams import (
    PAYLOAD_FIELD,
    Entry,
    StreamKeys,
    ack_and_delete,
    dead_letter,
    ensure_group,
    read_new,
    reclaim,
)

log = logging.getLogger(__name__)

Delivered = tuple[bytes, Batch]


class BatchReader:
    """One consumer of ``group`` on the training stream."""

    def __init__(
        self,
        client: redis.Redis,
        keys: StreamKeys,
        group: str,
        consumer: str,
        *,
        fingerprint: str,
        schema: dict[str, TensorSpec],
        max_bytes: int,
        dead_letter_maxlen: int,
        on_dead_letter: Callable[[str], None] | None = None,
    ) -> None:
        self.client, self.keys, self.group, self.consumer = client, keys, group, consumer
        self.on_dead_letter = on_dead_letter
        self.stream = keys.train
        self.fingerprint, self.schema, self.max_bytes = fingerprint, schema, max_bytes
        self.dead_letter_maxlen = dead_letter_maxlen
        self.dead_letters: Counter[str] = Counter()

    def setup(self, start_id: str = "0") -> None:
        ensure_group(self.client, self.stream, self.group, start_id)

    def reclaim(self, min_idle_ms: int) -> list[Delivered]:
        """This consumer's own pending entries, then idle ones of others."""
        entries = reclaim(self.client, self.stream, self.group, self.consumer, min_idle_ms)
        return self._usable(entries)

    def read(self, count: int, block_ms: int | None) -> list[Delivered]:
        entries = read_new(self.client, self.stream, self.group, self.consumer, count, block_ms)
        return self._usable(entries)

    def ack(self, ids: list[bytes]) -> int:
        return ack_and_delete(self.client, self.stream, self.group, ids)

    def _usable(self, entries: Iterable[Entry]) -> list[Delivered]:
        out: list[Delivered] = []
        gone: list[bytes] = []
        for entry_id, fields in entries:
            if not fields:  # deleted after delivery (acked elsewhere): just clear it
                gone.append(entry_id)
                continue
            try:
                payload = fields.get(PAYLOAD_FIELD)
                if payload is None:
                    raise CodecError("malformed", f"entry has no {PAYLOAD_FIELD.decode()!r} field")
                batch = decode(
                    payload,
                    fingerprint=self.fingerprint,
                    schema=self.schema,
                    max_bytes=self.max_bytes,
                )
            except CodecError as exc:
                self.dead_letters[exc.reason] += 1
                if self.on_dead_letter is not None:
                    self.on_dead_letter(exc.reason)
                dead_letter(
                    self.client,
                    self.keys,
                    source=self.stream,
                    entry_id=entry_id,
                    fields=fields,
                    reason=exc.reason,
                    detail=exc.detail,
                    maxlen=self.dead_letter_maxlen,
                    group=self.group,
                )
                continue
            out.append((entry_id, batch))
        if gone:
            self.client.xack(self.stream, self.group, *gone)
        return out


def validation_ready(client: redis.Redis, keys: StreamKeys, fingerprint: str) -> bool:
    return client.get(keys.val_done) == fingerprint.encode()


def read_validation(
    client: redis.Redis,
    keys: StreamKeys,
    *,
    fingerprint: str,
    schema: dict[str, TensorSpec],
    max_bytes: int,
) -> list[Batch]:
    """The whole fixed validation set, in order, read without consuming it.
    Call once :func:`validation_ready` is true. A bad entry here means the set
    itself is corrupt, so it raises instead of skipping."""
    batches = []
    for entry_id, fields in client.xrange(keys.val):
        try:
            batches.append(
                decode(
                    fields[PAYLOAD_FIELD],
                    fingerprint=fingerprint,
                    schema=schema,
                    max_bytes=max_bytes,
                )
            )
        except (CodecError, KeyError) as exc:
            raise CodecError(
                "malformed", f"validation entry {entry_id!r} is unusable: {exc}"
            ) from exc
    return batches
