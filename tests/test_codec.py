import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codec import DTYPES, Batch, CodecError, TensorSpec, decode, encode

FP = "0123456789abcdef"
REASONS = {
    "malformed",
    "wrong_type",
    "bad_shape",
    "bad_dtype",
    "oversized",
    "out_of_range",
    "duplicate_key",
    "unknown_field",
    "foreign_fingerprint",
    "unsupported_version",
    "schema_mismatch",
}


def sample_batch(**overrides) -> Batch:
    rng = np.random.default_rng(0)
    tensors = {
        "input": rng.integers(0, 66, (4, 32), dtype=np.uint8),
        "labels": rng.integers(0, 66, (4, 32), dtype=np.uint8),
    }
    fields = dict(
        fingerprint=FP, split="train", stage=2, producer=3, seq=41, tensors=tensors, created=1.5
    )
    fields.update(overrides)
    return Batch(**fields)


def message_dict(**changes):
    message = msgpack.unpackb(encode(sample_batch()), raw=False)
    message.update(changes)
    return message


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
    size = math.prod(shape)
    raw = draw(
        st.binary(min_size=size * DTYPES[dtype].itemsize, max_size=size * DTYPES[dtype].itemsize)
    )
    array = np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)
    if dtype == "bool":
        array = array.view(np.uint8).astype(bool)
    return array


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=st.dictionaries(st.text(min_size=1, max_size=10), arrays(), max_size=4),
    stage=st.integers(0, 2**31),
    producer=st.integers(0, 2**40),
    seq=st.integers(0, 2**63 - 1),
    split=st.sampled_from(["train", "val"]),
    created=st.floats(0, 2e9),
)
def test_round_trip(tensors, stage, producer, seq, split, created):
    batch = Batch(FP, split, stage, producer, seq, tensors, created)
    back = decode(encode(batch), fingerprint=FP)
    assert (back.fingerprint, back.split, back.stage, back.producer, back.seq, back.created) == (
        FP,
        split,
        stage,
        producer,
        seq,
        created,
    )
    assert set(back.tensors) == set(tensors)
    for name, array in tensors.items():
        got = back.tensors[name]
        assert got.dtype == array.dtype.newbyteorder("<") and got.shape == array.shape
        assert got.tobytes() == np.ascontiguousarray(array).tobytes()


def test_decoded_tensors_are_read_only():
    batch = decode(encode(sample_batch()))
    for array in batch.tensors.values():
        assert not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            array[0, 0] = 1


def test_big_endian_and_non_contiguous_inputs_travel_as_little_endian():
    big = np.arange(12, dtype=">i4").reshape(3, 4)
    strided = np.arange(40, dtype=np.uint16).reshape(5, 8)[:, ::2]
    back = decode(encode(sample_batch(tensors={"big": big, "strided": strided}))).tensors
    np.testing.assert_array_equal(back["big"], big)
    np.testing.assert_array_equal(back["strided"], strided)
    assert back["big"].dtype.byteorder in "<="


def test_tokens_travel_in_one_byte():
    payload = encode(sample_batch())
    assert len(payload) < 2 * 4 * 32 + 200


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (message_dict(v=2), "unsupported_version"),
        (message_dict(fp="ffffffffffffffff"), "foreign_fingerprint"),
        (message_dict(split="test"), "malformed"),
        (message_dict(stage=-1), "out_of_range"),
        (message_dict(seq=2**63), "out_of_range"),
        (message_dict(t=math.inf), "out_of_range"),
        (message_dict(extra=1), "unknown_field"),
        (message_dict(seq="41"), "wrong_type"),
        (message_dict(stage=True), "wrong_type"),
        (message_dict(t="now"), "wrong_type"),
        (message_dict(tensors=[1, 2]), "wrong_type"),
        (message_dict(tensors={"x": ["complex128", [1], b"\0" * 16]}), "bad_dtype"),
        (message_dict(tensors={"x": ["uint8", [2, 3], b"\0" * 5]}), "bad_shape"),
        (message_dict(tensors={"x": ["uint8", [-1], b""]}), "bad_shape"),
        (message_dict(tensors={"x": ["uint8", [1] * 9, b"\0"]}), "bad_shape"),
        (message_dict(tensors={"x": ["uint8", [2**40, 2**40], b"\0"]}), "bad_shape"),
        (message_dict(tensors={"x": ["uint8", [3], "abc"]}), "wrong_type"),
        (message_dict(tensors={"x": ["uint8", [3]]}), "wrong_type"),
        ({k: v for k, v in message_dict().items() if k != "seq"}, "malformed"),
        ([1, 2, 3], "wrong_type"),
    ],
)
def test_bad_messages_raise_with_a_reason(message, reason):
    with pytest.raises(CodecError) as err:
        decode(msgpack.packb(message, use_bin_type=True), fingerprint=FP)
    assert err.value.reason == reason


def test_oversized_is_refused_before_parsing():
    payload = encode(sample_batch())
    with pytest.raises(CodecError) as err:
        decode(payload, max_bytes=len(payload) - 1)
    assert err.value.reason == "oversized"


def test_schema_mismatch():
    schema = {"input": TensorSpec("uint8", (4, 32)), "labels": TensorSpec("uint8", (4, 32))}
    decode(encode(sample_batch()), schema=schema)
    wrong = {"input": TensorSpec("uint8", (4, 33)), "labels": TensorSpec("uint8", (4, 32))}
    with pytest.raises(CodecError) as err:
        decode(encode(sample_batch()), schema=wrong)
    assert err.value.reason == "schema_mismatch"
    with pytest.raises(CodecError) as err:
        decode(encode(sample_batch()), schema={"input": schema["input"]})
    assert err.value.reason == "schema_mismatch"


def test_trailing_bytes_and_ext_types_refused():
    with pytest.raises(CodecError, match="trailing"):
        decode(encode(sample_batch()) + b"\x00")
    with pytest.raises(CodecError) as err:
        decode(msgpack.packb(msgpack.ExtType(1, b"x")))
    assert err.value.reason == "malformed"


def test_every_truncation_is_a_codec_error():
    payload = encode(sample_batch())
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            decode(payload[:cut])


@settings(max_examples=500)
@given(garbage=st.binary(max_size=300))
def test_random_bytes_never_crash(garbage):
    try:
        decode(garbage)
    except CodecError as exc:
        assert exc.reason in REASONS


@settings(max_examples=500)
@given(data=st.data())
def test_corrupted_messages_never_crash_or_lie(data):
    payload = bytearray(encode(sample_batch()))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    try:
        batch = decode(bytes(payload))
    except CodecError as exc:
        assert exc.reason in REASONS
        return
    # If it still decodes, it says what the msgpack library reads in the same bytes, and
    # every tensor has exactly the bytes its declared dtype and shape need.
    reference = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=False)
    fields = ("fp", "split", "stage", "producer", "seq", "t")
    assert (batch.fingerprint, batch.split, batch.stage, batch.producer, batch.seq) == tuple(
        reference[key] for key in fields[:-1]
    )
    assert batch.created == float(reference["t"])
    assert set(batch.tensors) == set(reference["tensors"])
    for name, (dtype, shape, raw) in reference["tensors"].items():
        array = batch.tensors[name]
        assert (array.dtype, list(array.shape)) == (DTYPES[dtype], shape)
        assert len(raw) == math.prod(shape) * DTYPES[dtype].itemsize
        assert array.tobytes() == raw


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(0, 6), max_size=4),
    data=st.data(),
)
def test_tensor_bytes_must_match_the_declared_shape_in_both_directions(dtype, shape, data):
    """A tensor with more bytes than its dtype and shape need, or fewer, is refused as
    ``bad_shape`` (never reshaped, truncated or padded); exactly as many decode to that
    dtype and shape."""
    needed = math.prod(shape) * DTYPES[dtype].itemsize

    def with_bytes(size: int) -> bytes:
        message = message_dict(tensors={"x": [dtype, shape, b"\1" * size]})
        return msgpack.packb(message, use_bin_type=True)

    exact = decode(with_bytes(needed)).tensors["x"]
    assert (exact.dtype, list(exact.shape)) == (DTYPES[dtype], shape)
    assert exact.tobytes() == b"\1" * needed
    wrong = [needed + data.draw(st.integers(1, 2 * DTYPES[dtype].itemsize + 8), label="more")]
    if needed:
        wrong.append(needed - data.draw(st.integers(1, needed), label="fewer"))
    for size in wrong:
        with pytest.raises(CodecError) as err:
            decode(with_bytes(size))
        assert err.value.reason == "bad_shape", (dtype, shape, size)


@settings(max_examples=300)
@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text()
        | st.binary(),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=5), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_arbitrary_msgpack_values_never_crash(value):
    try:
        decode(msgpack.packb(value, use_bin_type=True))
    except CodecError as exc:
        assert exc.reason in REASONS


@pytest.mark.parametrize(
    ("message", "whose"),
    [
        (message_dict(fp="ffffffffffffffff"), True),
        (message_dict(v=2), True),
        (message_dict(extra=1), True),
        (message_dict(tensors={"x": ["complex128", [1], b"\0" * 16]}), True),
        (message_dict(stage=-1), True),
        (message_dict(seq=-1, fp="ffffffffffffffff"), False),
        (message_dict(producer="3", fp="ffffffffffffffff"), False),
        (message_dict(seq=True, fp="ffffffffffffffff"), False),
    ],
)
def test_a_refused_map_names_its_producer_and_seq_when_they_are_valid(message, whose):
    with pytest.raises(CodecError) as err:
        decode(msgpack.packb(message, use_bin_type=True), fingerprint=FP)
    expected = (message["producer"], message["seq"]) if whose else (None, None)
    assert (err.value.producer, err.value.seq) == expected
