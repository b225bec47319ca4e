"""The dataset contract stored in ``<ns>:meta``: what every producer and trainer
of a namespace must agree on, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import redis
import redis.connection

from shared.codec import TensorSpec
from shared.streams import StreamKeys

# Keys of the stored meta that are facts about who wrote it, not the contract.
_NOT_HASHED = ("fingerprint", "created", "created_by")


class ContractMismatch(Exception):
    """Redis holds another dataset contract than this process would write."""

    def __init__(self, key: str, differences: list[str]) -> None:
        lines = "\n".join(f"  {d}" for d in differences[:40])
        super().__init__(
            f"{key} describes another dataset contract; refusing to mix data. Differences "
            f"(stored -> ours):\n{lines}\nUse another --namespace, or delete the old run's keys "
            f"(redis-cli --scan --pattern '{key.rsplit(':', 1)[0]}:*' | xargs redis-cli del)."
        )
        self.differences = differences


def fingerprint(contract: dict[str, Any]) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of ``contract``."""
    hashed = {k: v for k, v in contract.items() if k not in _NOT_HASHED}
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def make_meta(contract: dict[str, Any], created_by: str) -> dict[str, Any]:
    # Round-trip through JSON so the meta compares equal to what Redis returns.
    body = json.loads(json.dumps(contract))
    return {
        **body,
        "fingerprint": fingerprint(body),
        "created": time.time(),
        "created_by": created_by,
    }


def schema_of(meta: dict[str, Any]) -> dict[str, TensorSpec]:
    return {
        name: TensorSpec(spec["dtype"], tuple(spec["shape"]))
        for name, spec in meta["schema"].items()
    }


def differences(stored: Any, ours: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON values."""
    if isinstance(stored, dict) and isinstance(ours, dict):
        out: list[str] = []
        for key in sorted(set(stored) | set(ours), key=str):
            if key in _NOT_HASHED:
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in stored:
                out.append(f"{sub}: (absent) -> {_short(ours[key])}")
            elif key not in ours:
                out.append(f"{sub}: {_short(stored[key])} -> (absent)")
            else:
                out.extend(differences(stored[key], ours[key], sub))
        return out
    if isinstance(stored, list) and isinstance(ours, list) and len(stored) == len(ours):
        out = []
        for i, (a, b) in enumerate(zip(stored, ours, strict=True)):
            out.extend(differences(a, b, f"{path}[{i}]"))
        return out
    return [] if stored == ours else [f"{path}: {_short(stored)} -> {_short(ours)}"]


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."


def publish_meta(client: redis.Redis, keys: StreamKeys, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``meta`` unless the namespace has one; return the stored meta.
    Raises ContractMismatch when the stored fingerprint differs."""
    stored = read_meta(client, keys)  # first: a full Redis refuses SET, not GET
    if stored is None:
        client.set(keys.meta, json.dumps(meta, ensure_ascii=False), nx=True)
        stored = read_meta(client, keys)
    if stored is None:  # deleted between SET NX and GET: try once more
        client.set(keys.meta, json.dumps(meta, ensure_ascii=False), nx=True)
        stored = read_meta(client, keys) or meta
    check_meta(keys, stored, meta)
    return stored


def check_meta(keys: StreamKeys, stored: dict[str, Any], ours: dict[str, Any]) -> None:
    if stored.get("fingerprint") != ours.get("fingerprint"):
        diff = differences(stored, ours) or [
            f"fingerprint: {stored.get('fingerprint')} -> {ours.get('fingerprint')}"
        ]
        raise ContractMismatch(keys.meta, diff)


class Reconnected(redis.ConnectionError):
    """The connection to Redis was re-established under a command; the owner
    restores its state and tries again."""


class ContractGuard:
    """A redis-py connect hook (``connect(..., on_connect=guard)``).

    On every (re)connection, before the connection serves any other command,
    it writes the contract if the server has none (a Redis that restarted
    empty) and refuses a server that holds another one. So a producer that
    reconnects behind redis-py's back can never add entries to a namespace
    without its contract, or to someone else's. ``connections`` counts them,
    which tells the owner to restore the rest of its state."""

    def __init__(self, keys: StreamKeys, meta: dict[str, Any]) -> None:
        self.keys, self.meta = keys, meta
        self.payload = json.dumps(meta, ensure_ascii=False)
        self.connections = 0
        # Set by the owner once its state in Redis is established. A new
        # connection while armed fails its first command with Reconnected, so
        # the owner restores its state (and checks what a restarted Redis
        # kept) before it writes anything on the new connection.
        self.armed = False

    def __call__(self, connection: redis.connection.AbstractConnection) -> None:
        connection.on_connect()
        connection.send_command("GET", self.keys.meta)
        raw = connection.read_response()
        if raw is None:
            # Only when missing: at maxmemory Redis refuses every SET, and a
            # full Redis must still let producers connect and wait for room.
            connection.send_command("SET", self.keys.meta, self.payload, "NX")
            connection.read_response()
            connection.send_command("GET", self.keys.meta)
            raw = connection.read_response()
        try:
            stored = json.loads(raw)
        except (TypeError, ValueError):
            stored = {"fingerprint": None}
        if not isinstance(stored, dict) or stored.get("fingerprint") != self.meta["fingerprint"]:
            connection.disconnect()
            check_meta(self.keys, stored if isinstance(stored, dict) else {}, self.meta)
        self.connections += 1
        if self.armed:
            self.armed = False
            raise Reconnected("reconnected to Redis: restoring state before writing again")


def read_meta(client: redis.Redis, keys: StreamKeys) -> dict[str, Any] | None:
    raw = client.get(keys.meta)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ContractMismatch(keys.meta, [f"stored meta is not JSON ({exc})"]) from None
    if not isinstance(meta, dict) or "fingerprint" not in meta:
        raise ContractMismatch(keys.meta, ["stored meta has no fingerprint"])
    return meta
