"""An independent client for the streams, written only from the README's Wire format.

Nothing from ``shared`` or ``services`` is imported: the decoder below uses ``msgpack``,
``numpy``, ``json``, ``hashlib`` and ``redis`` exactly as the document describes, so these
tests fail whenever the producer and the document disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis

from tests.helpers import wait_until

pytestmark = pytest.mark.slow

# --- the decoder: everything below follows the README's "Wire format" section ------------------

WIRE_DTYPES = {
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
}
MESSAGE_KEYS = {"v", "fp", "split", "stage", "producer", "seq", "t", "tensors"}
UNFINGERPRINTED = {"fingerprint", "created", "created_by"}
MAX_DIMS = 8


def is_int(value: object) -> bool:
    """A msgpack int (Python's bool is an int subclass, but msgpack has its own bool type)."""
    return type(value) is int


def contract_fingerprint(meta: dict) -> str:
    """First 16 hex digits of SHA-256 over the compact, key-sorted JSON of the contract."""
    body = {key: value for key, value in meta.items() if key not in UNFINGERPRINTED}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def read_meta(client: redis.Redis, ns: str) -> dict:
    raw = client.get(f"{ns}:meta")
    assert raw is not None, f"{ns}:meta is missing"
    meta = json.loads(raw.decode("utf-8"))
    assert isinstance(meta, dict)

    fingerprint = meta["fingerprint"]
    assert isinstance(fingerprint, str) and len(fingerprint) == 16
    assert set(fingerprint) <= set("0123456789abcdef"), fingerprint
    assert contract_fingerprint(meta) == fingerprint

    assert meta["format_version"] == 1
    for name, spec in meta["schema"].items():
        assert isinstance(name, str)
        assert set(spec) == {"dtype", "shape"}, spec
        assert spec["dtype"] in WIRE_DTYPES, spec
        assert all(is_int(dim) and dim >= 0 for dim in spec["shape"]), spec

    itos = meta["itos"]
    assert all(isinstance(symbol, str) for symbol in itos)
    assert itos[-1] == "[MASK]"
    assert meta["mask_token_id"] == len(itos) - 1
    characters = itos[:-1]
    assert characters == sorted(characters), "characters are not sorted by code point"
    assert len(set(characters)) == len(characters), "duplicate characters in itos"
    assert "[MASK]" not in characters

    assert is_int(meta["label_ignore_value"])
    assert is_int(meta["ignore_index"])
    assert set(meta["stages"]) == {"train", "val"}
    for key in ("batch_size", "block_size", "seed"):
        assert is_int(meta[key]), key
    assert isinstance(meta["corpus"], str)
    assert isinstance(meta["corpus_sha256"], str)
    return meta


def decode_tensor(name: str, value: object, spec: dict) -> np.ndarray:
    """``[dtype, shape, data]``: little-endian elements in C order, exact length."""
    assert isinstance(value, list) and len(value) == 3, (name, type(value))
    dtype, shape, data = value
    assert isinstance(dtype, str) and dtype in WIRE_DTYPES, (name, dtype)
    assert isinstance(shape, list) and len(shape) <= MAX_DIMS, (name, shape)
    assert all(is_int(dim) and dim >= 0 for dim in shape), (name, shape)
    assert isinstance(data, bytes), f"{name}: data is {type(data).__name__}, not bin"
    wire_dtype = np.dtype(dtype).newbyteorder("<")
    assert len(data) == int(np.prod(shape, dtype=np.int64)) * wire_dtype.itemsize, name
    assert dtype == spec["dtype"] and shape == spec["shape"], (name, dtype, shape, spec)
    array = np.frombuffer(data, dtype=wire_dtype).reshape(shape, order="C")
    return array.astype(np.dtype(dtype))  # native byte order from here on


def decode_message(raw: bytes, meta: dict, split: str) -> dict:
    message = msgpack.unpackb(raw, raw=False)
    assert isinstance(message, dict) and set(message) == MESSAGE_KEYS, message.keys()
    # Re-encoding with msgpack's defaults (smallest ints, float64, str/bin, no ext) must give
    # the same bytes: this checks the msgpack types of the table, not only the Python ones.
    assert msgpack.packb(message, use_bin_type=True) == raw, "not the documented encoding"

    assert is_int(message["v"]) and message["v"] == 1
    assert message["fp"] == meta["fingerprint"]
    assert message["split"] == split
    assert is_int(message["stage"]) and 0 <= message["stage"] < len(meta["stages"][split])
    assert is_int(message["producer"]) and message["producer"] >= 0
    if split == "val":
        assert message["producer"] == 0
    assert is_int(message["seq"]) and message["seq"] >= 0
    assert type(message["t"]) is float

    tensors = message["tensors"]
    assert isinstance(tensors, dict) and set(tensors) == set(meta["schema"]), tensors.keys()
    message["tensors"] = {
        name: decode_tensor(name, value, meta["schema"][name]) for name, value in tensors.items()
    }
    return message


def read_stream(client: redis.Redis, key: str, meta: dict, split: str) -> list[dict]:
    messages = []
    for _entry_id, fields in client.xrange(key):
        assert set(fields) == {b"d"}, fields.keys()
        messages.append(decode_message(fields[b"d"], meta, split))
    return messages


# --- the char-diffusion checks ----------------------------------------------------------------


@dataclass
class MaskCounts:
    selected: int = 0
    masked: int = 0


def check_char_diffusion(message: dict, meta: dict, corpus: str, counts: MaskCounts) -> None:
    itos, mask_id, ignore = meta["itos"], meta["mask_token_id"], meta["label_ignore_value"]
    shape = [meta["batch_size"], meta["block_size"]]
    inputs, labels = message["tensors"]["input"], message["tensors"]["labels"]
    for tensor in (inputs, labels):
        assert list(tensor.shape) == shape
        # The smallest unsigned dtype holding every token id plus one spare value.
        assert tensor.dtype.kind == "u" and np.iinfo(tensor.dtype).max >= len(itos)
        if len(itos) <= 255:
            assert tensor.dtype == np.uint8, f"{len(itos)} vocabulary entries, {tensor.dtype}"
        assert ignore == np.iinfo(tensor.dtype).max

    selected = labels != ignore
    assert (labels[selected] < mask_id).all(), "a label is not a real character"
    assert (inputs <= mask_id).all(), "an input id is outside the vocabulary"
    assert not (inputs[~selected] == mask_id).any(), "[MASK] at an unselected position"

    original = np.where(selected, labels, inputs)
    assert (original[~selected] == inputs[~selected]).all()
    assert (original < mask_id).all(), "[MASK] survived the reconstruction"
    for row in original:
        text = "".join(itos[i] for i in row)
        assert len(text) == meta["block_size"]
        assert text in corpus, f"reconstructed window is not in the corpus: {text!r}"

    counts.selected += int(selected.sum())
    counts.masked += int((inputs[selected] == mask_id).sum())


def check_sequences(messages: list[dict]) -> None:
    """``seq`` counts from 0 within (split, producer), in stream order."""
    by_producer: dict[int, list[int]] = {}
    for message in messages:
        by_producer.setdefault(message["producer"], []).append(message["seq"])
    for producer, seqs in by_producer.items():
        assert seqs == list(range(len(seqs))), (producer, seqs)


def produce_and_decode(
    client: redis.Redis, start_producer, args: list[str], corpus_path: Path, ns: str, backlog: int
) -> tuple[dict, list[dict], list[dict]]:
    """Run a producer until the validation set and ``backlog`` training batches are in
    Redis, stop it, and decode and check every entry of both streams."""
    started = time.time()
    producer = start_producer(
        *args, f"--corpus_path={corpus_path}", f"--namespace={ns}", f"--max_backlog={backlog}"
    )

    def ready() -> bool:
        if producer.proc.poll() is not None:
            raise AssertionError(f"producer exited early:\n{producer.output()[-3000:]}")
        return bool(client.exists(f"{ns}:val:done")) and client.xlen(f"{ns}:train") >= backlog

    wait_until(ready, 120, f"{ns}: validation set and {backlog} training batches")
    assert producer.terminate() == 0, producer.output()[-3000:]
    finished = time.time()

    corpus = corpus_path.read_bytes().decode("utf-8")
    meta = read_meta(client, ns)
    assert client.get(f"{ns}:val:done").decode() == meta["fingerprint"]

    train = read_stream(client, f"{ns}:train", meta, "train")
    val = read_stream(client, f"{ns}:val", meta, "val")
    assert len(train) >= backlog
    for message in train + val:
        assert started - 1 <= message["t"] <= finished + 1, message["t"]
    check_sequences(train)
    check_sequences(val)

    counts = MaskCounts()
    for message in train + val:
        check_char_diffusion(message, meta, corpus, counts)
    # At least 80% of the selected positions become [MASK] ("span" stages: all of them);
    # allow five standard deviations of a binomial sample below that.
    assert counts.selected > 0
    floor = 0.8 - 5 * math.sqrt(0.8 * 0.2 / counts.selected)
    assert counts.masked / counts.selected >= floor, counts
    return meta, train, val


# --- the tests ---------------------------------------------------------------------------------


def test_decode_shakespeare_char_diffusion(redis7, shakespeare, start_producer):
    args = [f"--redis_url={redis7.url}", "--preset=char_diffusion", "--val_batches=4"]
    meta, _, val = produce_and_decode(
        redis7.client(), start_producer, args, shakespeare, "wiretest", backlog=32
    )
    assert len(val) == 4
    assert set(meta["schema"]) == {"input", "labels"}


def test_decode_non_ascii_corpus(redis7, tmp_path, start_producer):
    lines = [
        f"{i:03d} héllo wörld ☃ naïve café — straße 日本語 🙂 ﬁn e\u0301 Ωmega ¿qué?\n"
        for i in range(200)
    ]
    corpus_path = tmp_path / "unicode.txt"
    corpus_path.write_text("".join(lines), encoding="utf-8")
    assert len(corpus_path.read_bytes()) > 8000

    args = [
        f"--redis_url={redis7.url}",
        "--batch_size=3",
        "--block_size=50",
        "--val_batches=2",
    ]
    meta, _, val = produce_and_decode(
        redis7.client(), start_producer, args, corpus_path, "wiretest2", backlog=8
    )
    assert len(val) == 2
    assert (meta["batch_size"], meta["block_size"]) == (3, 50)
    assert meta["schema"] == {
        "input": {"dtype": "uint8", "shape": [3, 50]},
        "labels": {"dtype": "uint8", "shape": [3, 50]},
    }


@pytest.mark.parametrize(
    "characters",
    [
        253,
        254,
        300,
    ],
)
def test_token_dtype_at_the_uint8_boundary(redis7, tmp_path, start_producer, characters):
    """``itos`` has ``characters + 1`` entries, ids up to ``characters``: ``uint8`` leaves 255
    spare for ``label_ignore_value`` while ``characters <= 254``. Beyond, ``uint16`` also
    checks the little-endian rule, which one-byte tensors cannot."""
    alphabet = [chr(code) for code in range(0x100, 0x500) if chr(code).isprintable()]
    corpus_path = tmp_path / f"alphabet{characters}.txt"
    corpus_path.write_text("".join(alphabet[:characters]) * 40, encoding="utf-8")

    args = [f"--redis_url={redis7.url}", "--batch_size=3", "--block_size=50", "--val_batches=2"]
    meta, _, _ = produce_and_decode(
        redis7.client(), start_producer, args, corpus_path, "wiretest3", backlog=4
    )
    token_dtype = np.dtype(np.uint8 if characters + 1 <= 255 else np.uint16)
    assert len(meta["itos"]) == characters + 1
    assert meta["schema"]["input"]["dtype"] == token_dtype.name
    assert meta["label_ignore_value"] == np.iinfo(token_dtype).max
