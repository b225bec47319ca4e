"""The Redis Streams transport: keys, connections, bounded adds, consumer-group
helpers, the dead-letter stream and the shared control keys.

Redis commands stay visible here on purpose; every function is one small step a
reader can check against the Redis documentation. Works on Redis 6.2 and 7.x.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    BusyLoadingError,
    ExecAbortError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ResponseError,
)
from redis.retry import Retry

if TYPE_CHECKING:
    from shared.settings import RunSettings

log = logging.getLogger(__name__)

# Errors after which a service should wait and try again, not die.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    BusyLoadingError,
)

PAYLOAD_FIELD = b"d"


class WrongTypeError(ResponseError):
    """Redis's WRONGTYPE: a key of ours holds another kind of value (a string where the
    stream was, say), written by hand. Nothing we send fixes it and restarting does not
    either; an operator must delete the key, and until then services wait."""


class DatabaseIndexError(ResponseError):
    """``ERR DB index is out of range``: redis_url names a database the server does not
    have (its path, ``/0``, must be below the server's ``databases``). A setting to fix."""


def _register_error_classes() -> None:
    """Make redis-py raise :class:`WrongTypeError` for WRONGTYPE replies and
    :class:`DatabaseIndexError` for a database out of range (it has no class of its own for
    either; its parsers, hiredis's included, map error codes and messages through this
    table)."""
    try:
        from redis._parsers.base import BaseParser
    except ImportError:  # another redis-py layout: both stay plain ResponseErrors
        return
    BaseParser.EXCEPTION_CLASSES.setdefault("WRONGTYPE", WrongTypeError)
    by_message = BaseParser.EXCEPTION_CLASSES.get("ERR")
    if isinstance(by_message, dict):
        by_message.setdefault("DB index is out of range", DatabaseIndexError)


_register_error_classes()


Entry = tuple[bytes, dict[bytes, bytes]]


class EntryFields(dict):
    """A stream entry's fields as a dict (the first value of each name), plus ``names``:
    every field name in the order Redis sent them. Redis keeps a repeated name
    (``XADD s * d <a> d <b>`` stores both), which a plain dict would fold into one field,
    hiding the other value from every check."""

    __slots__ = ("names",)

    def __init__(self, flat: list[bytes] | dict[bytes, bytes] | None) -> None:
        super().__init__()
        if isinstance(flat, dict):  # a map cannot repeat a name: nothing to keep
            flat = [item for pair in flat.items() for item in pair]
        flat = flat or []
        for name, value in zip(flat[::2], flat[1::2], strict=False):
            self.setdefault(name, value)
        self.names: tuple[bytes, ...] = tuple(flat[::2])


def _stream_list(response: Any, **_options: Any) -> Any:
    if response is None:
        return None
    return [(r[0], EntryFields(r[1])) if r is not None else (None, None) for r in response]


def _parse_xread(response: Any, **options: Any) -> Any:
    """[[stream, entries], ...] whether the reply came as RESP3's map or RESP2's array."""
    if not response:
        return []
    pairs = response.items() if isinstance(response, dict) else response
    return [[name, _stream_list(entries)] for name, entries in pairs]


def _parse_xclaim(response: Any, **options: Any) -> Any:
    return response if options.get("parse_justid") else _stream_list(response)


def _parse_xautoclaim(response: Any, **options: Any) -> Any:
    if options.get("parse_justid"):
        return response[1]
    response[1] = _stream_list(response[1])
    return response


def keep_repeated_fields(client: redis.Redis) -> redis.Redis:
    """Make ``client``'s stream reads return each entry's fields as :class:`EntryFields`
    (in the shapes redis-py's own callbacks give, from a RESP2 or RESP3 reply), so a
    repeated field name can be refused."""
    for command in ("XRANGE", "XREVRANGE"):
        client.set_response_callback(command, _stream_list)
    for command in ("XREAD", "XREADGROUP"):
        client.set_response_callback(command, _parse_xread)
    client.set_response_callback("XCLAIM", _parse_xclaim)
    client.set_response_callback("XAUTOCLAIM", _parse_xautoclaim)
    return client


@dataclass(frozen=True)
class StreamKeys:
    """Every Redis key of one namespace."""

    namespace: str

    def _key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    @property
    def train(self) -> str:
        return self._key("train")

    @property
    def val(self) -> str:
        return self._key("val")

    @property
    def meta(self) -> str:
        return self._key("meta")

    @property
    def dead(self) -> str:
        return self._key("dead")

    @property
    def stage(self) -> str:
        return self._key("stage")

    @property
    def max_backlog(self) -> str:
        """The producers' bound on the training stream (published, not hashed
        into the contract: changing it changes no data)."""
        return self._key("train:max_backlog")

    def failures(self, group: str) -> str:
        """Hash: entry id -> training steps of ``group`` that failed on it."""
        return self._key(f"train:failures:{group}")

    @property
    def producer_counter(self) -> str:
        return self._key("producer:next")

    @property
    def produced(self) -> str:
        """Hash: producer id -> last sequence number added to the train stream."""
        return self._key("train:produced")

    @property
    def reserved(self) -> str:
        """Hash: producer id -> "count:expiry_ms" of its reservation in flight."""
        return self._key("train:reserved")

    @property
    def val_lock(self) -> str:
        return self._key("val:lock")

    @property
    def val_done(self) -> str:
        return self._key("val:done")

    def producer_lease(self, producer_id: int) -> str:
        return self._key(f"producer:{producer_id}")

    def stream(self, split: str) -> str:
        return self.train if split == "train" else self.val


# --------------------------------------------------------------- connecting


def connect(
    url: str,
    password: str | None = None,
    *,
    username: str | None = None,
    block_s: float = 0.0,
    retries: int = 3,
    on_connect: Callable[[Any], None] | None = None,
) -> redis.Redis:
    """A client whose socket timeout exceeds the longest BLOCK it will issue
    (redis-py 8 defaults to 5 s, which would break long blocking reads), with
    jittered retries for short network blips. ``on_connect`` replaces the
    connection handshake (it must call ``connection.on_connect()``) and runs on
    every new connection, reconnections included."""
    # TCP keepalive is a TCP socket's option: a unix socket's connection refuses it.
    tcp = {} if url.startswith("unix:") else {"socket_keepalive": True}
    client = redis.Redis.from_url(
        url,
        redis_connect_func=on_connect,
        password=password,
        **({"username": username} if username else {}),
        socket_timeout=max(10.0, block_s + 5.0),
        socket_connect_timeout=2.0,
        **tcp,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
    return keep_repeated_fields(client)


def client_for(settings: RunSettings, **options: Any) -> redis.Redis:
    """The one way a service builds its Redis client from its settings
    (``options`` as for :func:`connect`)."""
    return connect(
        settings.redis_url, settings.password(), username=settings.redis_username, **options
    )


class Backoff:
    """Jittered exponential backoff for service loops ("full jitter")."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self.cap, self.base * 2 ** min(self.failures, 16)))

    def reset(self) -> None:
        self.failures = 0


def wait_for_redis(client: redis.Redis, stop: threading.Event, what: str = "Redis") -> bool:
    """Block until ``client`` answers PING; False if ``stop`` was set first."""
    backoff = Backoff()
    while not stop.is_set():
        try:
            client.ping()
            return True
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError):
            raise  # a refused password is no outage: the caller stops (shared/faults.py)
        except TRANSIENT_ERRORS as exc:
            delay = backoff.next_delay()
            log.warning(
                "%s unavailable (%s); retrying in %.1f s (check redis_url if it never answers)",
                what,
                exc,
                delay,
            )
            stop.wait(delay)
    return False


# ------------------------------------------------------------ bounded adds

# Backpressure without MAXLEN (on Redis 7 it silently drops entries no consumer
# has read). A producer reserves room with this script, atomically against XLEN
# and every other producer's live reservation, and appends at most that many
# entries with plain XADDs (payloads never pass through Lua, which would copy
# them twice). So the stream never holds more than ``max_backlog`` entries,
# whatever the number of producers. The script also reads the producer's last
# added sequence number, so a send repeated after a lost reply skips what is
# already there instead of duplicating it. A reservation expires after ARGV[5]
# ms, so a producer that dies holding one frees its room.
_RESERVE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local wanted = tonumber(ARGV[4])
if ARGV[6] == 'commit' then
  -- Called right after this producer's XADDs, in their MULTI: record them.
  redis.call('HSET', KEYS[2], ARGV[2], tonumber(ARGV[3]) - 1)
end
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '-1')
local skip = math.min(wanted, math.max(0, last - tonumber(ARGV[3]) + 1))
local held = 0
local holds = redis.call('HGETALL', KEYS[3])
for i = 1, #holds, 2 do
  if holds[i] ~= ARGV[2] then
    local count, expiry = string.match(holds[i + 1], '^(%d+):(%d+)$')
    if count == nil or tonumber(expiry) < now then
      redis.call('HDEL', KEYS[3], holds[i])
    else
      held = held + tonumber(count)
    end
  end
end
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1]) - held
local grant = math.max(0, math.min(wanted - skip, room))
if grant > 0 then
  redis.call('HSET', KEYS[3], ARGV[2], grant .. ':' .. (now + tonumber(ARGV[5])))
else
  redis.call('HDEL', KEYS[3], ARGV[2])
end
return {skip, grant}
"""

RESERVATION_TTL_MS = 30_000


class BoundedStream:
    """A stream that never holds more than ``max_backlog`` entries.

    ``produced_key`` (hash) records each producer's last added sequence number;
    ``reserved_key`` (hash) holds reservations in flight. A send is one round
    trip in the steady state: the MULTI that appends a chunk also reserves room
    for the next one, so only the first send, a send after an error, and sends
    while the stream is full pay a separate reservation."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        max_backlog: int,
        *,
        produced_key: str,
        reserved_key: str,
    ) -> None:
        self.client, self.key, self.max_backlog = client, key, max_backlog
        self.produced_key, self.reserved_key = produced_key, reserved_key
        self._reserve = client.register_script(_RESERVE)
        # Room reserved ahead for (producer, first sequence number) at a time.
        self._ahead: tuple[int, int] | None = None
        self._ahead_grant = 0
        self._ahead_at = 0.0

    def _reservation(self, producer: int, first_seq: int, wanted: int) -> tuple[int, int]:
        """(skip, grant): how many of ``wanted`` payloads from ``first_seq`` the
        stream already holds, and how many more it has room for now."""
        fresh = time.monotonic() - self._ahead_at < RESERVATION_TTL_MS / 2000
        if self._ahead == (producer, first_seq) and self._ahead_grant and fresh:
            return 0, min(self._ahead_grant, wanted)
        skip, grant = self._reserve(
            keys=[self.key, self.produced_key, self.reserved_key],
            args=[self.max_backlog, producer, first_seq, wanted, RESERVATION_TTL_MS, ""],
        )
        return int(skip), int(grant)

    def add(self, payloads: list[bytes], producer: int, first_seq: int) -> int:
        """Append the longest prefix of ``payloads`` (sequence numbers
        ``first_seq``, ``first_seq + 1``, ... of ``producer``) that fits.
        Returns how many of them the stream now holds, counting ones a previous
        call already added."""
        if not payloads:
            return 0
        skip, grant = self._reservation(producer, first_seq, len(payloads))
        self._ahead = None  # consumed or stale from here on
        if not grant:
            return skip
        next_seq = first_seq + skip + grant
        pipe = self.client.pipeline(transaction=True)
        for payload in payloads[skip : skip + grant]:
            pipe.xadd(self.key, {PAYLOAD_FIELD: payload})
        # Record them and reserve for the next chunk (assumed the same size) in
        # the same MULTI. EVALSHA by hand: redis-py would add a SCRIPT EXISTS
        # round trip to every pipeline that runs a registered script.
        pipe.evalsha(
            self._reserve.sha,
            3,
            self.key,
            self.produced_key,
            self.reserved_key,
            self.max_backlog,
            producer,
            next_seq,
            len(payloads),
            RESERVATION_TTL_MS,
            "commit",
        )
        try:
            results = pipe.execute(raise_on_error=False)
        except ExecAbortError as exc:
            cause = exec_abort_cause(exc)
            if cause is exc:
                raise
            raise cause from exc
        if isinstance(results[-1], NoScriptError):  # a restarted Redis: the XADDs did happen
            self._reserve(
                keys=[self.key, self.produced_key, self.reserved_key],
                args=[self.max_backlog, producer, next_seq, 0, RESERVATION_TTL_MS, "commit"],
            )
            return skip + grant
        for result in results:
            if isinstance(result, Exception):
                raise result
        _skip, ahead = results[-1]
        self._ahead, self._ahead_grant, self._ahead_at = (
            (producer, next_seq),
            int(ahead),
            time.monotonic(),
        )
        return skip + grant

    def release(self, producer: int) -> None:
        """Give back room reserved ahead (on shutdown)."""
        self._ahead = None
        self.client.hdel(self.reserved_key, str(producer))

    def last_seq(self, producer: int) -> int:
        """The last sequence number ``producer`` added (-1: none)."""
        value = self.client.hget(self.produced_key, str(producer))
        return int(value) if value is not None else -1

    def backlog(self) -> int:
        return int(self.client.xlen(self.key))


def exec_abort_cause(exc: ExecAbortError) -> Exception:
    """The error behind an EXECABORT, as redis-py raises it outside a transaction.

    Redis checks maxmemory (and ACLs) when each command is queued *and* again at
    EXEC; when another client filled Redis in between, EXEC fails with
    ``EXECABORT Transaction discarded because of: OOM ...``. That is the same
    backpressure as an OOM at queueing (an :class:`OutOfMemoryError`), and
    callers must treat it alike; any other cause is returned unchanged."""
    reason = str(exc).split("because of:", 1)[-1].strip()
    if reason.startswith("OOM"):
        return OutOfMemoryError(reason)
    if reason.startswith("NOPERM"):
        return NoPermissionError(reason)
    return exc


def add_unbounded(client: redis.Redis, key: str, payloads: list[bytes]) -> list[bytes]:
    """Pipelined XADD (the fixed validation set; benchmarks' raw baseline)."""
    pipe = client.pipeline(transaction=False)
    for payload in payloads:
        pipe.xadd(key, {PAYLOAD_FIELD: payload})
    return pipe.execute()


# --------------------------------------------------------- consumer groups


def ensure_group(client: redis.Redis, stream: str, group: str, start_id: str = "0") -> bool:
    """Create ``group`` on ``stream`` (and the stream); False if it existed."""
    try:
        client.xgroup_create(stream, group, id=start_id, mkstream=True)
        return True
    except ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise


def read_new(
    client: redis.Redis, stream: str, group: str, consumer: str, count: int, block_ms: int | None
) -> list[Entry]:
    """Entries never delivered to anyone (XREADGROUP ... >). ``client`` must
    have a socket timeout above ``block_ms`` (see :func:`connect`)."""
    reply = client.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
    return _entries(reply)


def read_own_pending(
    client: redis.Redis, stream: str, group: str, consumer: str, count: int, after: str = "0"
) -> list[Entry]:
    """Entries delivered to ``consumer`` and not acked yet, oldest first.
    Entries deleted meanwhile come back with empty fields."""
    reply = client.xreadgroup(group, consumer, {stream: after}, count=count)
    return _entries(reply)


def autoclaim(
    client: redis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
) -> Iterator[Entry]:
    """Take over entries idle for ``min_idle_ms`` in other consumers' pending
    lists (XAUTOCLAIM, cursor loop). Redis 6.2 replies [cursor, entries];
    7.x adds the ids of deleted entries, which 7.x also drops from the PEL."""
    cursor = "0-0"
    while True:
        reply = client.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=count)
        cursor = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        for entry_id, fields in reply[1]:
            yield entry_id, fields or {}  # entry_id is None for a deleted entry on 6.2
        if cursor == "0-0":
            return


def reclaim(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    min_idle_ms: int,
    count: int = 100,
) -> Iterator[Entry]:
    """What a restarted consumer must process before new entries: its own
    pending list first, then idle entries of consumers that are gone."""
    seen: set[bytes] = set()

    def own_pending() -> Iterator[Entry]:
        after = "0"
        while own := read_own_pending(client, stream, group, consumer, count, after):
            for entry in own:
                if entry[0] not in seen:
                    seen.add(entry[0])
                    yield entry
            after = own[-1][0].decode()

    yield from own_pending()
    unnamed = 0
    for entry in autoclaim(client, stream, group, consumer, min_idle_ms, count):
        if entry[0] is None:
            unnamed += 1  # Redis 6.2: a deleted entry, claimed but not named
        elif entry[0] not in seen:  # XAUTOCLAIM may return our own entries too
            seen.add(entry[0])
            yield entry
    if unnamed:
        # They are in our pending list now, where XREADGROUP shows their ids.
        yield from own_pending()


def ack_and_delete(
    client: redis.Redis,
    stream: str,
    group: str,
    ids: list[bytes],
    failures_key: str | None = None,
) -> int:
    """XACK then XDEL, so the stream's length is the backlog. Returns how many
    were acked by this call. A plain pipeline, not MULTI: at maxmemory Redis
    aborts a whole transaction, while XACK and XDEL alone go through and free
    memory."""
    if not ids:
        return 0
    pipe = client.pipeline(transaction=False)
    pipe.xack(stream, group, *ids)
    pipe.xdel(stream, *ids)
    if failures_key is not None:
        pipe.hdel(failures_key, *ids)  # done with them: forget their failed steps
    acked = pipe.execute()[0]
    return int(acked)


def pending_count(client: redis.Redis, stream: str, group: str) -> int:
    try:
        return int(client.xpending(stream, group)["pending"])
    except ResponseError as exc:
        if "NOGROUP" in str(exc):
            return 0
        raise


# --------------------------------------------------------------- dead letters


DEAD_LETTER_HEAD = 4096  # bytes of a bad payload kept for inspection


def dead_letter(
    client: redis.Redis,
    keys: StreamKeys,
    *,
    source: str,
    entry_id: bytes | str,
    fields: dict[bytes, bytes],
    reason: str,
    detail: str,
    maxlen: int,
    group: str | None = None,
    producer: int | None = None,
    seq: int | None = None,
) -> bool:
    """Record a bad entry in the dead-letter stream, then (for a consumer
    group) ack and delete the original so nobody trains on it.

    The record is bounded whatever the entry: reason, detail, where it came
    from, producer/seq when they were readable, the payload's length and
    SHA-256 and its first 4 KiB. If the record cannot be written (Redis full,
    no permission) the entry is still acked and deleted, and False comes
    back: a bad entry must never block the queue."""
    payload = fields.get(PAYLOAD_FIELD)  # the first 'd' of an EntryFields
    if payload is None:  # no 'd' field: keep the first one there is
        payload = next(iter(fields.values()), b"")
    names = getattr(fields, "names", None) or tuple(sorted(fields))
    record: dict[str | bytes, Any] = {
        "reason": reason,
        "detail": detail[:1000],
        "source": source,
        "id": entry_id,
        "fields": b",".join(names)[:200],
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_head": payload[:DEAD_LETTER_HEAD],
    }
    if producer is not None and seq is not None:
        record["producer"], record["seq"] = producer, seq
    stored = True
    try:
        client.xadd(keys.dead, record, maxlen=maxlen, approximate=True)
    except ResponseError as exc:  # OOM at maxmemory, NOPERM: lose the record, not the queue
        stored = False
        log.error(
            "could not record dead letter %s %s (%s: %s): %s; removing the entry anyway",
            source,
            entry_id,
            reason,
            detail[:200],
            exc,
        )
    if group is not None:
        # A plain pipeline, not MULTI: at maxmemory Redis aborts a whole
        # transaction, while XACK and XDEL alone go through and free memory.
        pipe = client.pipeline(transaction=False)
        pipe.xack(source, group, entry_id)
        pipe.xdel(source, entry_id)
        pipe.execute()
    if stored:
        log.warning("dead-lettered %s %s: %s (%s)", source, entry_id, reason, detail[:200])
    return stored


# ------------------------------------------------------------- control keys


def read_active_stage(client: redis.Redis, keys: StreamKeys) -> int:
    try:
        value = client.get(keys.stage)
    except WrongTypeError:  # a list, say, written by hand: as good as garbage
        log.warning("ignoring %s: it holds another kind of value than a string", keys.stage)
        return 0
    try:
        return max(0, int(value)) if value is not None else 0
    except ValueError:
        log.warning("ignoring non-integer active stage %r in %s", value, keys.stage)
        return 0


def publish_active_stage(client: redis.Redis, keys: StreamKeys, stage: int) -> None:
    client.set(keys.stage, int(stage))


_RENEW_LEASE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local next_id = tonumber(redis.call('GET', KEYS[2]) or '0')
if next_id < tonumber(ARGV[3]) then redis.call('SET', KEYS[2], ARGV[3]) end
return 1
"""


class ProducerLease:
    """A producer id held through a key with a TTL.

    Ids come from INCR, so replicas get unique ids with no configuration. The
    lease is renewed periodically; renewal also pushes the counter past the id,
    so a Redis that lost its data cannot hand the same id to a newcomer once
    the holder has renewed. If renewal finds another owner, the holder must take
    a new id (``renew`` returns False)."""

    def __init__(self, client: redis.Redis, keys: StreamKeys, token: str, ttl_ms: int) -> None:
        self.client, self.keys, self.token, self.ttl_ms = client, keys, token, ttl_ms
        self._renew = client.register_script(_RENEW_LEASE)
        self.producer_id: int | None = None

    def acquire(self, wanted: int | None = None, stop: threading.Event | None = None) -> int | None:
        """A producer id: ``wanted`` once its lease is free (a producer
        restarted within its lease waits it out), else a new one. None if
        ``stop`` is set while waiting."""
        if wanted is not None:
            announced = False
            while not self._try(wanted):
                if not announced:
                    log.warning(
                        "producer_id %d is held by another producer (or by this one before a "
                        "restart): waiting up to %d s for its lease to expire; unset "
                        "producer_id to get a free one",
                        wanted,
                        self.ttl_ms // 1000,
                    )
                    announced = True
                if stop is None or stop.wait(1.0):
                    return None
            self.producer_id = wanted
            return wanted
        while True:
            candidate = int(self.client.incr(self.keys.producer_counter)) - 1
            if self.client.set(
                self.keys.producer_lease(candidate), self.token, nx=True, px=self.ttl_ms
            ):
                self.producer_id = candidate
                return candidate

    def _try(self, producer_id: int) -> bool:
        return bool(
            self._renew(
                keys=[self.keys.producer_lease(producer_id), self.keys.producer_counter],
                args=[self.token, self.ttl_ms, producer_id + 1],
            )
        )

    def renew(self) -> bool:
        assert self.producer_id is not None
        return self._try(self.producer_id)

    def release(self) -> None:
        if self.producer_id is None:
            return
        key = self.keys.producer_lease(self.producer_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.watch(key)
        if pipe.get(key) == self.token.encode():
            pipe.multi()
            pipe.delete(key)
            pipe.execute()
        else:
            pipe.reset()


def _entries(reply: Any) -> list[Entry]:
    """Flatten an XREADGROUP reply ([[stream, [(id, fields), ...]], ...], the shape
    redis-py's callbacks and :func:`keep_repeated_fields` give) to a list of entries."""
    out: list[Entry] = []
    for _name, entries in reply or ():
        for entry_id, fields in entries:
            out.append((entry_id, fields or {}))
    return out
