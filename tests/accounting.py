"""Exact per-(producer, seq) accounting of a run, from Redis and the
trainers' ack logs: every batch produced is acked once, dead-lettered, still
queued, or (after a Redis restart without persistence) provably lost."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from shared.codec import decode
from shared.streams import PAYLOAD_FIELD, StreamKeys

KEYS = StreamKeys("maskstream")


def acked_entries(ack_log: Path) -> Counter:
    """(producer, seq) -> times acked, over every rank's audit file."""
    counts: Counter = Counter()
    for path in ack_log.parent.glob(ack_log.name + ".rank*"):
        for line in path.read_text().splitlines():
            producer, seq, _entry = line.split()
            counts[(int(producer), int(seq))] += 1
    return counts


def dead_lettered(client, keys: StreamKeys = KEYS) -> Counter:
    """(producer, seq) -> dead-letter records of training entries that named them."""
    return Counter(
        (int(fields[b"producer"]), int(fields[b"seq"]))
        for _, fields in client.xrange(keys.dead)
        if b"producer" in fields and fields[b"source"] == keys.train.encode()
    )


def in_stream(client, keys: StreamKeys = KEYS) -> Counter:
    """(producer, seq) -> entries of the training stream that carry it."""
    return Counter(
        (b.producer, b.seq)
        for _, fields in client.xrange(keys.train)
        for b in [decode(fields[PAYLOAD_FIELD])]
    )


def close_accounts(
    client,
    acked: Counter,
    keys: StreamKeys = KEYS,
    lost: set[tuple[int, int]] = frozenset(),
) -> dict[str, int]:
    """produced = acked once + dead-lettered + still queued (pending or
    waiting) + ``lost``, for every sequence number, each in one place only.
    Producers must be stopped."""
    produced = {
        (int(p), seq)
        for p, last in client.hgetall(keys.produced).items()
        for seq in range(int(last) + 1)
    }
    queued = in_stream(client, keys)
    dead = dead_lettered(client, keys)
    dead_produced = {key for key in dead if key in produced}  # not hand-made poison
    assert max(acked.values(), default=1) == 1, "an entry was acked twice"
    assert max(queued.values(), default=1) == 1, "an entry is in the stream twice"
    assert not set(acked) & set(queued), "an acked entry is still in the stream"
    assert not dead_produced & (set(acked) | set(queued)), "dead-lettered yet trained on"
    assert not set(lost) & (set(acked) | set(queued) | dead_produced), "lost yet seen"
    accounted = set(acked) | set(queued) | dead_produced | set(lost)
    assert accounted == produced, (
        f"missing: {sorted(produced - accounted)[:10]}, "
        f"unexpected: {sorted(accounted - produced)[:10]}"
    )
    pending = sum(g["pending"] for g in client.xinfo_groups(keys.train))
    return {
        "produced": len(produced),
        "dead": len(dead_produced),
        "lost": len(lost),
        "acked": len(acked),
        "in_stream": len(queued),
        "pending": pending,
    }
