"""Hostile input for the consumer's checks: whatever the bytes, only the typed
CodecError comes out, and decoding stays bounded in memory."""

from __future__ import annotations

import random
import tracemalloc

import msgpack
import numpy as np
import pytest

from shared.codec import Batch, CodecError, TensorSpec, decode, encode, max_message_size
from shared.contract import fingerprint
from shared.streams import PAYLOAD_FIELD
from shared.validation import REASONS, EntryValidator

B, T, VOCAB, MASK, IGNORE = 4, 32, 66, 65, 255
SCHEMA = {"input": TensorSpec("uint8", (B, T)), "labels": TensorSpec("uint8", (B, T))}
META = {
    "schema": {k: v.to_json() for k, v in SCHEMA.items()},
    "vocab_size": VOCAB,
    "mask_token_id": MASK,
    "label_ignore_value": IGNORE,
    "stages": {"train": [{"type": "random"}] * 3, "val": [{"type": "random"}]},
}
META["fingerprint"] = fingerprint(META)
VALIDATOR = EntryValidator(META, "train", max_bytes=64 * 2**20)


def valid_message(rng: random.Random) -> bytes:
    inputs = np.frombuffer(rng.randbytes(B * T), np.uint8).reshape(B, T) % VOCAB
    labels = np.where(inputs % 7 == 0, inputs % MASK, IGNORE).astype(np.uint8)
    batch = Batch(
        META["fingerprint"], "train", rng.randrange(3), rng.randrange(8), rng.randrange(99), {}
    )
    batch.tensors.update(input=inputs, labels=labels)
    return encode(batch)


def _packed(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _map(pairs: list[tuple[object, object]]) -> bytes:
    head = b"\xde" + len(pairs).to_bytes(2, "big")
    return head + b"".join(_packed(k) + _packed(v) for k, v in pairs)


def hostile(rng: random.Random) -> bytes:
    """One input from a family of attacks, chosen by the seeded generator."""
    kind = rng.randrange(9)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(0, 300))
    message = bytearray(valid_message(rng))
    if kind == 1:  # flip, insert or delete a few bytes
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(len(message))
            action = rng.randrange(3)
            if action == 0:
                message[i] = rng.randrange(256)
            elif action == 1:
                message.insert(i, rng.randrange(256))
            else:
                del message[i]
        return bytes(message)
    if kind == 2:  # inflated length field: bin/str/array/map headers claiming 4 GiB
        head = rng.choice([b"\xc6", b"\xdb", b"\xdd", b"\xdf"])
        return head + b"\xff\xff\xff\xff" + bytes(message[: rng.randrange(64)])
    if kind == 3:  # truncated
        return bytes(message[: rng.randrange(len(message))])
    if kind == 4:  # huge declared shapes
        shape = rng.choice([[2**62, 2**62], [0, 2**63], [2**31] * 8, [-1, 4], [B, T, 2**40]])
        tensors = {"input": ["uint8", shape, b""], "labels": ["uint8", [B, T], bytes(B * T)]}
        return _map([("v", 1), ("fp", META["fingerprint"]), ("split", "train"), ("stage", 0),
                     ("producer", 0), ("seq", 0), ("t", 1.0), ("tensors", tensors)])  # fmt: skip
    if kind == 5:  # deep nesting
        depth = rng.randrange(10, 3000)
        return b"\x91" * depth + b"\xc0"
    if kind == 6:  # duplicate keys, at the top or inside tensors
        pairs = list(msgpack.unpackb(bytes(message)).items())
        pairs.append(rng.choice(pairs))
        return _map(pairs)
    if kind == 7:  # non-string keys
        pairs = list(msgpack.unpackb(bytes(message)).items())
        pairs.append((rng.choice([7, -1, 1.5, b"v", None, True]), 1))
        return _map(pairs)
    # a wrong value in a valid frame
    pairs = dict(msgpack.unpackb(bytes(message)))
    key = rng.choice(list(pairs))
    pairs[key] = rng.choice([None, -1, 2**64 - 1, "x" * 300, [], {}, 1e308 * 10, b"\x00"])
    return _map(list(pairs.items()))


def test_fuzzed_entries_raise_only_the_typed_error() -> None:
    rng = random.Random(20261130)
    reasons = set()
    accepted = 0
    for _ in range(60_000):
        data = hostile(rng)
        try:
            VALIDATOR.check({PAYLOAD_FIELD: data})
            accepted += 1  # a mutation can leave a valid message (a flipped token, say)
        except CodecError as exc:
            assert exc.reason in REASONS, exc.reason
            reasons.add(exc.reason)
    # The families reach most refusal paths; few mutants stay valid.
    print(f"{accepted} of 60,000 accepted; reasons {sorted(reasons)}")
    assert len(reasons) >= 10, reasons
    assert accepted < 6_000


def test_valid_messages_pass_and_round_trip() -> None:
    rng = random.Random(1)
    for _ in range(200):
        data = valid_message(rng)
        batch = VALIDATOR.check({PAYLOAD_FIELD: data})
        assert encode(batch) == data


def test_maximum_size_hostile_entry_keeps_memory_bounded() -> None:
    """The largest entry the checks parse, built to make the parser allocate
    as much as it can (many tiny objects): peak memory stays under 8x its size."""
    big = {"input": TensorSpec("uint8", (16, 1024)), "labels": TensorSpec("uint8", (16, 1024))}
    limit = max_message_size(big)  # the reference recipe's batch: 33,792 bytes
    # A tree of arrays, 11 wide (the most an array may hold) and 4 deep, of
    # empty bins: about 16,000 objects from 29 KB, every limit respected.
    data = b"\xc4\x00"
    for _ in range(4):
        data = b"\x9b" + data * 11
    assert len(data) <= limit
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode(data, schema=big, fingerprint=META["fingerprint"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak {peak} bytes for a {len(data)}-byte entry ({peak / len(data):.1f}x)")
    assert peak < 8 * limit, f"peak {peak} bytes for a {len(data)}-byte entry"


def test_entries_longer_than_the_schema_allows_are_refused_before_parsing() -> None:
    limit = max_message_size(SCHEMA)
    with pytest.raises(CodecError) as err:
        decode(b"\xc1" * (limit + 1), schema=SCHEMA)  # parsing would say "malformed"
    assert err.value.reason == "oversized"
