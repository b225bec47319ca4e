"""The decoder the codec used before it moved to the msgpack library's C
unpacker: a pure-Python msgpack reader that returns zero-copy tensor views.
Kept only so ``make bench-producer`` measures both in the same run.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from shared.codec import (
    DEFAULT_MAX_BYTES,
    DTYPES,
    FORMAT_VERSION,
    MAX_NDIM,
    SPLITS,
    Batch,
    CodecError,
    TensorSpec,
    _check_schema,  # the same schema check as the codec's
)

MAX_DEPTH = 6


def decode_handwritten(
    data: bytes | bytearray | memoryview,
    *,
    fingerprint: str | None = None,
    schema: dict[str, TensorSpec] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Batch:
    """Decode one message. With ``fingerprint`` or ``schema`` given, a message of
    another dataset contract is refused (``foreign_fingerprint`` /
    ``schema_mismatch``)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("wrong_type", f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise CodecError("oversized", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    reader = _Reader(memoryview(data).cast("B") if isinstance(data, memoryview) else data)
    message = reader.read(0)
    if reader.pos != len(data):
        raise CodecError("malformed", f"{len(data) - reader.pos} trailing bytes after the message")
    if not isinstance(message, dict):
        raise CodecError("wrong_type", "a message must be a map")
    version = _field(message, "v", int)
    if version != FORMAT_VERSION:
        raise CodecError(
            "unsupported_version", f"format version {version}, expected {FORMAT_VERSION}"
        )
    fp = _field(message, "fp", str)
    if fingerprint is not None and fp != fingerprint:
        raise CodecError(
            "foreign_fingerprint", f"fingerprint {fp!r}, this run's is {fingerprint!r}"
        )
    split = _field(message, "split", str)
    if split not in SPLITS:
        raise CodecError("malformed", f"split {split!r} is not one of {SPLITS}")
    stage, producer, seq = (_field(message, key, int) for key in ("stage", "producer", "seq"))
    if min(stage, producer, seq) < 0:
        raise CodecError("malformed", "stage, producer and seq must not be negative")
    created = _field(message, "t", float)
    raw_tensors = _field(message, "tensors", dict)
    tensors = {name: _tensor(name, value) for name, value in raw_tensors.items()}
    if schema is not None:
        _check_schema(tensors, schema)
    return Batch(fp, split, stage, producer, seq, tensors, created)


def _field(message: dict[str, Any], key: str, kind: type) -> Any:
    if key not in message:
        raise CodecError("malformed", f"missing field {key!r}")
    value = message[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CodecError(
            "wrong_type", f"field {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _tensor(name: Any, value: Any) -> np.ndarray:
    if not isinstance(name, str):
        raise CodecError("wrong_type", "tensor names must be strings")
    if not (isinstance(value, list) and len(value) == 3):
        raise CodecError("wrong_type", f"tensor {name!r} must be [dtype, shape, bytes]")
    dtype_name, shape, raw = value
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CodecError("bad_dtype", f"tensor {name!r} has dtype {dtype_name!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise CodecError("bad_shape", f"tensor {name!r} has shape {shape!r}")
    if not isinstance(raw, memoryview):
        raise CodecError("wrong_type", f"tensor {name!r} data must be msgpack bin")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if expected != raw.nbytes:
        raise CodecError(
            "bad_shape",
            f"tensor {name!r}: shape {shape} of {dtype_name} needs {expected} bytes, "
            f"got {raw.nbytes}",
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    array.flags.writeable = False
    return array


class _Reader:
    """A strict msgpack reader for the subset we use (no ext types); bin values
    come back as memoryviews into the input."""

    __slots__ = ("buf", "pos", "view")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.buf = data
        self.view = memoryview(data)
        self.pos = 0

    def _take(self, n: int) -> int:
        start = self.pos
        end = start + n
        if end > len(self.buf):
            raise CodecError("truncated", f"needs {end} bytes, message has {len(self.buf)}")
        self.pos = end
        return start

    def _unpack(self, fmt: str, n: int) -> Any:
        return struct.unpack_from(fmt, self.buf, self._take(n))[0]

    def _str(self, n: int) -> str:
        start = self._take(n)
        try:
            return bytes(self.view[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError("malformed", "a string is not valid UTF-8") from None

    def _count(self, n: int) -> int:
        # Every element takes at least one byte: a larger count cannot be real.
        if n > len(self.buf) - self.pos:
            raise CodecError("truncated", f"container claims {n} items, too few bytes remain")
        return n

    def read(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CodecError("malformed", f"nesting deeper than {MAX_DEPTH}")
        b = self.buf[self._take(1)]
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        if 0x90 <= b <= 0x9F:
            return self._array(b & 0x0F, depth)
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F, depth)
        if b == 0xC0:
            return None
        if b in (0xC2, 0xC3):
            return b == 0xC3
        if b in (0xC4, 0xC5, 0xC6):
            n = self._unpack((">B", ">H", ">I")[b - 0xC4], (1, 2, 4)[b - 0xC4])
            start = self._take(n)
            return self.view[start : start + n]
        if b == 0xCA:
            return self._unpack(">f", 4)
        if b == 0xCB:
            return self._unpack(">d", 8)
        if 0xCC <= b <= 0xD3:
            fmt, n = _INTS[b - 0xCC]
            return self._unpack(fmt, n)
        if b in (0xD9, 0xDA, 0xDB):
            return self._str(self._unpack((">B", ">H", ">I")[b - 0xD9], (1, 2, 4)[b - 0xD9]))
        if b in (0xDC, 0xDD):
            return self._array(self._unpack((">H", ">I")[b - 0xDC], (2, 4)[b - 0xDC]), depth)
        if b in (0xDE, 0xDF):
            return self._map(self._unpack((">H", ">I")[b - 0xDE], (2, 4)[b - 0xDE]), depth)
        raise CodecError("malformed", f"unsupported msgpack type byte 0x{b:02x}")

    def _array(self, n: int, depth: int) -> list[Any]:
        return [self.read(depth + 1) for _ in range(self._count(n))]

    def _map(self, n: int, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for _ in range(self._count(n)):
            key = self.read(depth + 1)
            if not isinstance(key, str | int):
                raise CodecError("wrong_type", "map keys must be strings or integers")
            out[key] = self.read(depth + 1)
        return out


_INTS = [
    (">B", 1),
    (">H", 2),
    (">I", 4),
    (">Q", 8),
    (">b", 1),
    (">h", 2),
    (">i", 4),
    (">q", 8),
]
