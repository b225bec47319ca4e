"""The wire format: self-describing msgpack batches with raw little-endian tensors.

A message is one msgpack map (README, "Wire format")::

    {"v": 1, "fp": str, "split": "train"|"val", "stage": int, "producer": int,
     "seq": int, "t": float, "tensors": {name: [dtype, [dim, ...], bin]}}

Encoding and decoding use the msgpack library (its C unpacker, with length
limits taken from the entry's size). Anything malformed raises
:class:`CodecError` with a reason, never another exception or a silently
wrong array; :mod:`shared.validation` then checks the contents against the
dataset contract.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 64 * 2**20
MAX_NDIM = 8
SPLITS = ("train", "val")

# Wire dtype names -> little-endian numpy dtypes. Nothing else is accepted.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
    )
}


class CodecError(ValueError):
    """A message that cannot be decoded. ``reason`` is a short stable code
    (used as the dead-letter reason and metric label); the text says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        # Set when the message is a map whose producer and seq are valid, whatever else
        # is wrong with it: whose it is, for the dead letter.
        self.producer: int | None = None
        self.seq: int | None = None


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Batch:
    fingerprint: str
    split: str
    stage: int
    producer: int
    seq: int
    tensors: dict[str, np.ndarray]
    created: float = field(default_factory=time.time)


# ------------------------------------------------------------------- encode


def encode(batch: Batch) -> bytes:
    tensors = {}
    for name, array in batch.tensors.items():
        wire = _wire_dtype_name(array.dtype)
        # np.require keeps 0-d arrays 0-d (ascontiguousarray would not).
        contiguous = np.require(array, dtype=DTYPES[wire], requirements="C")
        raw = memoryview(contiguous.reshape(-1).view(np.uint8))
        tensors[name] = [wire, list(contiguous.shape), raw]
    return msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "fp": batch.fingerprint,
            "split": batch.split,
            "stage": batch.stage,
            "producer": batch.producer,
            "seq": batch.seq,
            "t": float(batch.created),
            "tensors": tensors,
        },
        use_bin_type=True,
    )


def _wire_dtype_name(dtype: np.dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise CodecError("bad_dtype", f"dtype {name} cannot travel; use one of {sorted(DTYPES)}")
    return name


# ------------------------------------------------------------------- decode

FIELDS = frozenset({"v", "fp", "split", "stage", "producer", "seq", "t", "tensors"})
INT64_MAX = 2**63 - 1
# Bytes a message holds beyond its tensors' raw bytes: the keys, the small
# values, and per tensor its name, dtype, shape and bin header. Generous.
HEADER_SLACK = 1024
MAX_NAME = 64  # longest tensor name or dtype or fingerprint we accept


def max_message_size(schema: dict[str, TensorSpec]) -> int:
    """The largest a valid message of ``schema`` can be: its raw tensor bytes
    plus :data:`HEADER_SLACK`. Readers refuse longer entries before parsing."""
    raw = sum(math.prod(s.shape) * DTYPES[s.dtype].itemsize for s in schema.values())
    return raw + HEADER_SLACK


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """msgpack's map hook: string keys only, each once (a plain dict would keep
    the last of duplicate keys silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise CodecError("wrong_type", f"map keys must be strings, got {type(key).__name__}")
        if key in out:
            raise CodecError("duplicate_key", f"key {key!r} appears twice in one map")
        out[key] = value
    return out


def _no_ext(code: int, data: bytes) -> Any:
    """msgpack's ext hook: the format has no ext values (max_ext_len=0 refuses
    those with a payload; this refuses the empty ones the same way)."""
    raise CodecError("malformed", f"an ext value (type {code}) is not part of the format")


def decode(
    data: bytes | bytearray | memoryview,
    *,
    fingerprint: str | None = None,
    schema: dict[str, TensorSpec] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Batch:
    """Decode one message and check its structure; anything wrong raises
    :class:`CodecError` with a reason. With ``fingerprint`` or ``schema`` given,
    a message of another dataset contract is refused (``foreign_fingerprint`` /
    ``schema_mismatch``).

    The msgpack library's C unpacker does the parsing, with every length limit
    set from the entry's own size, so its work and memory grow with the bytes
    received, never with what a header claims. Each tensor is a read-only numpy
    view of the bin the unpacker returned (one copy of the raw bytes)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("wrong_type", f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if schema is not None:
        max_bytes = min(max_bytes, max_message_size(schema))
    if size > max_bytes:
        raise CodecError("oversized", f"{size} bytes exceeds the limit of {max_bytes}")
    try:
        message = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            object_pairs_hook=_pairs,
            strict_map_key=False,  # _pairs refuses non-string keys with a reason
            max_bin_len=size,
            max_str_len=min(size, 4 * MAX_NAME),
            max_array_len=MAX_NDIM + 3,
            max_map_len=len(FIELDS) + 8,
            max_ext_len=0,
            ext_hook=_no_ext,
        )
    except CodecError:
        raise
    except msgpack.ExtraData:
        raise CodecError("malformed", "trailing bytes after the message") from None
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:
        # msgpack's OutOfData, FormatError, StackError, and limit errors.
        # The library's own words name the limit or defect (first 160 characters).
        why = f"{type(exc).__name__}: {str(exc)[:160]}" if str(exc) else type(exc).__name__
        raise CodecError("malformed", f"not a msgpack message: {why}") from None
    if not isinstance(message, dict):
        raise CodecError("wrong_type", "a message must be a map")
    try:
        return _message(message, fingerprint, schema)
    except CodecError as exc:
        # Whose it is, for the dead letter, whatever else is wrong with it.
        producer, seq = message.get("producer"), message.get("seq")
        if all(type(v) is int and 0 <= v <= INT64_MAX for v in (producer, seq)):
            exc.producer, exc.seq = producer, seq
        raise


def _message(
    message: dict[str, Any], fingerprint: str | None, schema: dict[str, TensorSpec] | None
) -> Batch:
    """The checks of a decoded map (docs/wire-format.md, checks 4 to 9)."""
    # The version first, whatever else the map holds: a later format may add or
    # drop keys, and its messages must read as "unsupported_version".
    version = message.get("v")
    if type(version) is int and version != FORMAT_VERSION:
        raise CodecError(
            "unsupported_version", f"format version {version}, expected {FORMAT_VERSION}"
        )
    if set(message) != FIELDS:
        missing, extra = sorted(FIELDS - set(message)), sorted(set(message) - FIELDS)
        raise CodecError(
            "malformed" if missing else "unknown_field",
            f"missing fields {missing}" if missing else f"unknown fields {extra}",
        )
    _field(message, "v", int)  # an int other than 1 was refused above
    fp = _field(message, "fp", str)
    if fingerprint is not None and fp != fingerprint:
        raise CodecError(
            "foreign_fingerprint", f"fingerprint {fp[:MAX_NAME]!r}, this run's is {fingerprint!r}"
        )
    split = _field(message, "split", str)
    if split not in SPLITS:
        raise CodecError("malformed", f"split {split[:MAX_NAME]!r} is not one of {SPLITS}")
    stage, producer, seq = (_field(message, key, int) for key in ("stage", "producer", "seq"))
    if not (0 <= stage <= INT64_MAX and 0 <= producer <= INT64_MAX and 0 <= seq <= INT64_MAX):
        raise CodecError("out_of_range", "stage, producer and seq must be int64 and not negative")
    created = _field(message, "t", float)
    if not math.isfinite(created):
        raise CodecError("out_of_range", f"produce time t={created} is not finite")
    raw_tensors = _field(message, "tensors", dict)
    # Every tensor's structure first (check 8), then the schema (check 9), then the arrays:
    # a shape such as [0, 2**63 - 1] is valid with empty data, but no numpy array has it.
    parts = {name: _tensor(name, value) for name, value in raw_tensors.items()}
    if schema is not None:
        _check_schema(
            {name: TensorSpec(d.name, shape) for name, (d, shape, _) in parts.items()}, schema
        )
    tensors = {name: _array(name, *part) for name, part in parts.items()}
    return Batch(fp, split, stage, producer, seq, tensors, created)


def _field(message: dict[str, Any], key: str, kind: type) -> Any:
    value = message[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CodecError(
            "wrong_type", f"field {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _tensor(name: str, value: Any) -> tuple[np.dtype, tuple[int, ...], bytes]:
    """A tensor's dtype, shape and data, each checked, and the shape against the data."""
    if not (isinstance(value, list) and len(value) == 3):
        raise CodecError("wrong_type", f"tensor {name[:MAX_NAME]!r} must be [dtype, shape, bytes]")
    dtype_name, shape, raw = value
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CodecError("bad_dtype", f"tensor {name[:MAX_NAME]!r} has dtype {dtype_name!r:.80}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= INT64_MAX for d in shape
        )
    ):
        raise CodecError("bad_shape", f"tensor {name[:MAX_NAME]!r} has shape {shape!r:.120}")
    if not isinstance(raw, bytes):
        raise CodecError("wrong_type", f"tensor {name[:MAX_NAME]!r} data must be msgpack bin")
    dtype = DTYPES[dtype_name]
    # Python ints: a product that overflows int64 cannot match a real length.
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(raw):
        raise CodecError(
            "bad_shape",
            f"tensor {name[:MAX_NAME]!r}: shape {shape} of {dtype_name} needs {expected} bytes, "
            f"got {len(raw)}",
        )
    return dtype, tuple(shape), raw


def _array(name: str, dtype: np.dtype, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    try:
        return np.frombuffer(raw, dtype=dtype).reshape(shape)  # read-only: bytes are immutable
    except ValueError:  # empty data, yet dimensions whose product numpy cannot hold
        raise CodecError(
            "bad_shape", f"tensor {name[:MAX_NAME]!r}: numpy cannot hold shape {shape!r:.120}"
        ) from None


def _check_schema(tensors: dict[str, TensorSpec], schema: dict[str, TensorSpec]) -> None:
    if set(tensors) != set(schema):
        raise CodecError(
            "schema_mismatch",
            f"tensors {sorted(tensors)[:8]}, the schema has {sorted(schema)}",
        )
    for name, spec in schema.items():
        got = tensors[name]
        if got != spec:
            raise CodecError("schema_mismatch", f"tensor {name!r} is {got}, the schema says {spec}")
