"""An independent client for the streams, written only from docs/wire-format.md.

Nothing from ``shared`` or ``services`` is imported: the client below uses ``msgpack``,
``numpy``, ``json``, ``hashlib`` and ``redis`` as the page describes, so these tests fail
whenever the code and the page disagree. It runs the whole conformance set
(tests/vectors/: every valid vector decodes to its expected content, every invalid one is
refused with its reason), and it reads what real producers write: rows rebuilt into corpus
text, sequence numbers, and the selection and corruption rates of every stage type checked
against the page's formulas.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis

from tests.helpers import wait_until

# --- the client: everything below follows docs/wire-format.md ---------------------------------

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
# The keys of "A message", in its table's order (the canonical one).
TABLE_ORDER = ("v", "fp", "split", "stage", "producer", "seq", "t", "tensors")
MESSAGE_KEYS = set(TABLE_ORDER)
UNFINGERPRINTED = {"fingerprint", "created", "created_by"}
MAX_DIMS = 8
INT64_MAX = 2**63 - 1
HEADER_SLACK = 1024  # bytes a message may hold beyond its tensors' raw bytes
MAX_STR_BYTES, MAX_ARRAY, MAX_MAP = 256, 11, 16
# "The contract": every field, with its JSON type.
META_FIELDS = {
    "format_version": int,
    "dataset": str,
    "schema": dict,
    "seed": int,
    "val_batches": int,
    "use_all_stages_for_training": bool,
    "corpus": str,
    "corpus_sha256": str,
    "itos": list,
    "vocab_size": int,
    "mask_token_id": int,
    "label_ignore_value": int,
    "ignore_index": int,
    "batch_size": int,
    "block_size": int,
    "train_val_split": float,
    "stages": dict,
    "fingerprint": str,
    "created": float,
    "created_by": str,
}
STAGE_PARAMETERS = {
    "random": {"max_masked_ratio": float},
    "sticky": {"target_masked_ratio": float, "p1_probability": float, "p2_probability": float},
    "span": {"spans_count": int},
    "bernoulli": {"masked_ratio": float},
    "uniform": {"min_ratio": float},
}
# Listed only when they differ from 0.1 (the BERT-style corruption of every type but span and
# uniform).
CORRUPTION_PARAMETERS = {"random_token_probability": float, "keep_probability": float}


class Refused(Exception):
    """The entry is refused; ``reason`` is the page's dead-letter reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def is_int(value: object) -> bool:
    """A msgpack int (Python's bool is an int subclass, but msgpack has its own bool type)."""
    return type(value) is int


def contract_fingerprint(meta: dict) -> str:
    """First 16 hex digits of SHA-256 over the compact, key-sorted JSON of the contract.
    Python's json keeps every number literal of the stored text (a float stays a float)."""
    body = {key: value for key, value in meta.items() if key not in UNFINGERPRINTED}
    return hashlib.sha256(canonical_contract(body)).hexdigest()[:16]


def canonical_contract(body: dict) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def check_contract(meta: dict) -> None:
    assert set(meta) == set(META_FIELDS), f"fields not on the page: {set(meta) ^ set(META_FIELDS)}"
    for key, kind in META_FIELDS.items():
        assert type(meta[key]) is kind, (key, meta[key])

    fingerprint = meta["fingerprint"]
    assert len(fingerprint) == 16 and set(fingerprint) <= set("0123456789abcdef"), fingerprint
    assert contract_fingerprint(meta) == fingerprint
    assert meta["format_version"] == 1
    assert len(meta["corpus_sha256"]) == 64 and set(meta["corpus_sha256"]) <= set(
        "0123456789abcdef"
    )

    for name, spec in meta["schema"].items():
        assert isinstance(name, str)
        assert set(spec) == {"dtype", "shape"}, spec
        assert spec["dtype"] in WIRE_DTYPES, spec
        assert all(is_int(dim) and dim >= 0 for dim in spec["shape"]), spec

    itos = meta["itos"]
    assert all(isinstance(symbol, str) for symbol in itos)
    assert itos[-1] == "[MASK]"
    characters = itos[:-1]
    assert all(len(c) == 1 for c in characters), "a vocabulary entry is not one code point"
    assert characters == sorted(characters), "characters are not sorted by code point"
    assert len(set(characters)) == len(characters), "duplicate characters in itos"
    assert meta["vocab_size"] == len(itos) and meta["mask_token_id"] == len(itos) - 1

    # The smallest unsigned dtype holding every id plus one spare value, the ignore value.
    token_dtype = next(
        np.dtype(d) for d in ("uint8", "uint16", "uint32") if len(itos) <= np.iinfo(d).max
    )
    shape = [meta["batch_size"], meta["block_size"]]
    schema = {
        "input": {"dtype": token_dtype.name, "shape": shape},
        "labels": {"dtype": token_dtype.name, "shape": shape},
    }
    stages = meta["stages"]["train"] + meta["stages"]["val"]
    if any(stage["type"] == "uniform" for stage in stages):
        schema["mask_ratio"] = {"dtype": "float32", "shape": [meta["batch_size"]]}
    assert meta["schema"] == schema
    assert meta["label_ignore_value"] == np.iinfo(token_dtype).max
    assert meta["batch_size"] >= 1 and meta["block_size"] >= 2 and meta["val_batches"] >= 1
    assert 0 < meta["train_val_split"] < 1

    assert set(meta["stages"]) == {"train", "val"}
    for stage in meta["stages"]["train"] + meta["stages"]["val"]:
        parameters = dict(STAGE_PARAMETERS[stage["type"]])
        if stage["type"] not in ("span", "uniform"):
            parameters.update({k: v for k, v in CORRUPTION_PARAMETERS.items() if k in stage})
        assert set(stage) == {"type", "val_loss_stale_count", *parameters}, stage
        stale = stage["val_loss_stale_count"]
        assert stale is None or (is_int(stale) and stale >= 1), stage
        for key, kind in parameters.items():
            assert type(stage[key]) is kind, (stage, key)


def read_meta(client: redis.Redis, ns: str) -> dict:
    raw = client.get(f"{ns}:meta")
    assert raw is not None, f"{ns}:meta is missing"
    meta = json.loads(raw.decode("utf-8"))
    check_contract(meta)
    return meta


def size_limit(meta: dict) -> int:
    raw = 0
    for spec in meta["schema"].values():
        raw += math.prod(spec["shape"]) * np.dtype(spec["dtype"]).itemsize
    return raw + HEADER_SLACK


def _unique_str_keys(pairs: list[tuple[object, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if not all(type(key) is str for key in keys):
        raise Refused("wrong_type", "a map key is not a str")
    if len(set(keys)) != len(keys):
        raise Refused("duplicate_key", "a key twice in one map")
    return dict(pairs)


def _no_ext(code: int, data: bytes) -> object:
    raise Refused("malformed", f"ext type {code}")


def _within_limits(value: object) -> None:
    if isinstance(value, str) and len(value.encode("utf-8")) > MAX_STR_BYTES:
        raise Refused("malformed", "a str over 256 bytes")
    if isinstance(value, msgpack.Timestamp):
        raise Refused("malformed", "a timestamp ext value")
    if isinstance(value, list):
        if len(value) > MAX_ARRAY:
            raise Refused("malformed", "an array over 11 elements")
        for item in value:
            _within_limits(item)
    if isinstance(value, dict):
        if len(value) > MAX_MAP:
            raise Refused("malformed", "a map over 16 pairs")
        for key, item in value.items():
            _within_limits(key)
            _within_limits(item)


def decode_tensor(name: str, value: object) -> tuple[str, list[int], bytes]:
    """``[dtype, shape, data]`` checked: little-endian elements in C order, exact length.
    No array yet: a shape with a 0 holds no data whatever its other dimensions, and one such
    as [0, 2**63 - 1] is valid here but no numpy array can have it; the schema refuses it."""
    if not (isinstance(value, list) and len(value) == 3 and isinstance(value[2], bytes)):
        raise Refused("wrong_type", f"tensor {name} is not [dtype, shape, bin]")
    dtype, shape, data = value
    if not (isinstance(dtype, str) and dtype in WIRE_DTYPES):
        raise Refused("bad_dtype", f"{name}: {dtype!r}")
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(is_int(dim) and 0 <= dim <= INT64_MAX for dim in shape)
    ):
        raise Refused("bad_shape", f"{name}: {shape!r}")
    wire_dtype = np.dtype(dtype).newbyteorder("<")
    if math.prod(shape) * wire_dtype.itemsize != len(data):  # Python ints: no overflow
        raise Refused("bad_shape", f"{name}: {shape} does not fit {len(data)} bytes")
    return dtype, shape, data


def to_array(dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    array = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return array.astype(np.dtype(dtype))  # native byte order from here on


def check_entry(fields: dict[bytes, bytes], meta: dict, stream: str) -> dict:
    """The page's "What a consumer checks", in its order: the decoded message (tensors as
    ``{name: (array, raw bytes)}``), or :class:`Refused` with the reason."""
    if set(fields) != {b"d"}:
        raise Refused("bad_entry_fields", str(sorted(fields)))
    raw = fields[b"d"]
    if len(raw) > size_limit(meta):
        raise Refused("oversized", f"{len(raw)} bytes")
    try:
        message = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=False,
            object_pairs_hook=_unique_str_keys,
            ext_hook=_no_ext,
        )
    except Refused:
        raise
    except Exception as exc:  # syntax, truncation, trailing bytes, UTF-8, nesting
        raise Refused("malformed", type(exc).__name__) from None
    _within_limits(message)
    if not isinstance(message, dict):
        raise Refused("wrong_type", "not a map")
    if is_int(message.get("v")) and message["v"] != 1:
        raise Refused("unsupported_version", str(message["v"]))
    if MESSAGE_KEYS - set(message):
        raise Refused("malformed", f"missing {sorted(MESSAGE_KEYS - set(message))}")
    if set(message) - MESSAGE_KEYS:
        raise Refused("unknown_field", str(sorted(set(message) - MESSAGE_KEYS)))
    ints = ("v", "stage", "producer", "seq")
    if (
        not all(is_int(message[key]) for key in ints)
        or not all(type(message[key]) is str for key in ("fp", "split"))
        or type(message["t"]) not in (int, float)
        or not isinstance(message["tensors"], dict)
    ):
        raise Refused("wrong_type", "a value of the wrong type")
    if message["fp"] != meta["fingerprint"]:
        raise Refused("foreign_fingerprint", message["fp"])
    if message["split"] not in ("train", "val"):
        raise Refused("malformed", message["split"])
    if not all(0 <= message[key] <= INT64_MAX for key in ints[1:]):
        raise Refused("out_of_range", "stage, producer or seq")
    if not math.isfinite(message["t"]):
        raise Refused("out_of_range", "t")

    checked = {name: decode_tensor(name, value) for name, value in message["tensors"].items()}
    for name, spec in meta["schema"].items():
        if name not in checked:
            raise Refused("schema_mismatch", f"no {name}")
        dtype, shape, _ = checked[name]
        if dtype != spec["dtype"] or shape != spec["shape"]:
            raise Refused("schema_mismatch", name)
    if set(checked) != set(meta["schema"]):
        raise Refused("schema_mismatch", str(sorted(checked)))
    tensors = {name: (to_array(*part), part[2]) for name, part in checked.items()}

    if message["split"] != stream:
        raise Refused("wrong_split", message["split"])
    if message["stage"] >= len(meta["stages"][stream]):
        raise Refused("bad_stage", str(message["stage"]))
    if "mask_ratio" in tensors:
        ratio = tensors["mask_ratio"][0]
        stage = meta["stages"][stream][message["stage"]]
        low = np.float32(stage["min_ratio"] if stage["type"] == "uniform" else 0.0)
        if not ((ratio >= low) & (ratio <= 1)).all():  # NaN fails both
            raise Refused("out_of_range", "mask_ratio")
    inputs, labels = tensors["input"][0], tensors["labels"][0]
    if (inputs >= meta["vocab_size"]).any():
        raise Refused("bad_tokens", str(inputs.max()))
    real = (labels < meta["vocab_size"]) & (labels != meta["mask_token_id"])
    if not (real | (labels == meta["label_ignore_value"])).all():
        raise Refused("bad_labels", "")
    return {**message, "t": float(message["t"]), "tensors": tensors}


def is_canonical(raw: bytes, meta: dict) -> bool:
    """What our encoder writes: the smallest encodings, a 64-bit float for ``t``, the keys in
    the table's order and the tensors in the schema's."""
    message = msgpack.unpackb(raw, raw=False)
    ordered = {key: message[key] for key in TABLE_ORDER}
    ordered["tensors"] = {name: message["tensors"][name] for name in meta["schema"]}
    packed = msgpack.packb(ordered, use_bin_type=True)  # a Python float: float 64
    return type(message["t"]) is float and packed == raw


def reconstruct(message: dict, meta: dict) -> list[str]:
    inputs, labels = message["tensors"]["input"][0], message["tensors"]["labels"][0]
    original = np.where(labels != meta["label_ignore_value"], labels, inputs)
    return ["".join(meta["itos"][i] for i in row) for row in original]


def sticky_count(meta: dict, stage: dict) -> int:
    length = meta["block_size"]
    return min(length, math.ceil(stage["target_masked_ratio"] * length - 1e-9))


# --- the conformance set ------------------------------------------------------------------------

VECTORS = Path(__file__).resolve().parent / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text(encoding="utf-8"))


def vector_meta() -> dict:
    return json.loads((VECTORS / INDEX["meta"]).read_text(encoding="utf-8"))


def vector_entry(vector: dict) -> dict[bytes, bytes]:
    fields = {}
    for name, value in vector["entry"].items():
        if "file" in value:
            fields[name.encode()] = (VECTORS / value["file"]).read_bytes()
        else:
            fields[name.encode()] = base64.b64decode(value["base64"])
    return fields


def test_conformance_contract():
    meta = vector_meta()
    check_contract(meta)
    body = {key: value for key, value in meta.items() if key not in UNFINGERPRINTED}
    hashed = (VECTORS / INDEX["contract_canonical"]).read_bytes()
    assert canonical_contract(body) == hashed
    assert hashlib.sha256(hashed).hexdigest()[:16] == meta["fingerprint"]
    assert INDEX["max_message_bytes"] == size_limit(meta)

    # As JavaScript's JSON.parse reads it (a whole-number float becomes an integer), the
    # contract hashes differently: why the page makes comparing fp the check.
    def as_javascript(text: str) -> float | int:
        number = float(text)
        return int(number) if number.is_integer() else number

    text = (VECTORS / INDEX["meta"]).read_text(encoding="utf-8")
    assert contract_fingerprint(json.loads(text, parse_float=as_javascript)) != meta["fingerprint"]


@pytest.mark.parametrize("vector", INDEX["valid"], ids=lambda v: v["name"])
def test_conformance_valid_vector(vector):
    meta = vector_meta()
    fields = vector_entry(vector)
    message = check_entry(fields, meta, vector["stream"])
    assert {key: message[key] for key in vector["message"]} == vector["message"]
    for name, want in vector["tensors"].items():
        array, data = message["tensors"][name]
        assert [array.dtype.name, list(array.shape)] == [want["dtype"], want["shape"]]
        assert hashlib.sha256(data).hexdigest() == want["sha256"]
    rows = reconstruct(message, meta)
    assert rows == vector["rows"]
    corpus = (VECTORS / INDEX["corpus"]).read_bytes().decode("utf-8")
    assert all(row in corpus for row in rows)
    assert hashlib.sha256(corpus.encode("utf-8")).hexdigest() == meta["corpus_sha256"]
    labels = message["tensors"]["labels"][0]
    selected = (labels != meta["label_ignore_value"]).sum(axis=1).tolist()
    assert selected == vector["selected_per_row"]
    stage = meta["stages"][message["split"]][message["stage"]]
    assert stage["type"] == vector["stage_type"]
    if stage["type"] == "sticky":
        assert selected == [sticky_count(meta, stage)] * len(rows)
    check_mask_ratio(message, meta)
    assert is_canonical(fields[b"d"], meta) == vector["canonical"]


@pytest.mark.parametrize("vector", INDEX["invalid"], ids=lambda v: v["name"])
def test_conformance_invalid_vector(vector):
    with pytest.raises(Refused) as refused:
        check_entry(vector_entry(vector), vector_meta(), vector["stream"])
    assert refused.value.reason == vector["reason"], str(refused.value)


# --- the rates of the page's formulas -------------------------------------------------------------


@dataclass
class StageRates:
    """What one stage of a live stream produced."""

    stage: dict
    length: int
    shares: list[float] = field(default_factory=list)  # selected share per row
    counts: list[int] = field(default_factory=list)  # selected per row
    selected: int = 0
    masked: int = 0
    unchanged: int = 0


def five_sigma(observed: float, expected: float, variance: float, what: str) -> None:
    tolerance = 5 * math.sqrt(variance) + 1e-9
    assert abs(observed - expected) <= tolerance, f"{what}: {observed:.4f}, expected {expected:.4f}"


def check_mask_ratio(message: dict, meta: dict) -> None:
    """Each row's ``mask_ratio``: its drawn t for a uniform stage (in [min_ratio, 1),
    stratified over the batch, every selected position [MASK]), else its selected share."""
    if "mask_ratio" not in meta["schema"]:
        assert "mask_ratio" not in message["tensors"]
        return
    ratio = message["tensors"]["mask_ratio"][0]
    inputs, labels = message["tensors"]["input"][0], message["tensors"]["labels"][0]
    selected = labels != meta["label_ignore_value"]
    stage = meta["stages"][message["split"]][message["stage"]]
    if stage["type"] != "uniform":
        assert ratio.tolist() == selected.mean(axis=1, dtype=np.float32).tolist()
        return
    epsilon, rows = stage["min_ratio"], len(ratio)
    assert ((ratio >= np.float32(epsilon)) & (ratio < 1)).all(), ratio
    strata = np.sort((ratio.astype(np.float64) - epsilon) / (1 - epsilon))
    # a_i = (i + v_i) / B lies in stratum i; float32 rounding may reach a stratum's edge.
    assert (np.floor(strata * rows + 1e-4) >= np.arange(rows)).all(), strata
    assert (np.floor(strata * rows - 1e-4) <= np.arange(rows)).all(), strata
    assert (inputs[selected] == meta["mask_token_id"]).all()


def check_rates(rates: StageRates, n_real: int) -> None:
    """Selection and corruption of one stage against "Selection, per stage type"."""
    stage, length, rows = rates.stage, rates.length, len(rates.shares)
    mean = float(np.mean(rates.shares))
    kind = stage["type"]
    if kind == "bernoulli":
        p = stage["masked_ratio"]
        five_sigma(mean, p, p * (1 - p) / (length * rows), f"{stage}: selected share")
    elif kind == "random":
        m = stage["max_masked_ratio"]
        variance = m * m / 12 + (m / 2 - m * m / 3) / length
        five_sigma(mean, m / 2, variance / rows, f"{stage}: selected share")
    elif kind == "span":
        n, i = stage["spans_count"], np.arange(length)
        expected = float(np.mean((1 - (1 - 2 * (i + 1) / (length + 1)) ** (2 * n)) / 2))
        variance = max(float(np.var(rates.shares)), 1e-4)
        five_sigma(mean, expected, variance / rows, f"{stage}: selected share")
    elif kind == "sticky":
        k = min(length, math.ceil(stage["target_masked_ratio"] * length - 1e-9))
        off = [count for count in rates.counts if count != k]
        assert not off, (stage, k, off)  # exactly k per row
    elif kind == "uniform":
        # t uniform on [e, 1), then Binomial(T, t): the share's variance adds E[t(1 - t)]/T.
        e = stage["min_ratio"]
        t_mean, t_var = (1 + e) / 2, (1 - e) ** 2 / 12
        variance = t_var + (t_mean - t_var - t_mean**2) / length
        five_sigma(mean, t_mean, variance / rows, f"{stage}: selected share")

    if kind in ("span", "uniform"):
        assert rates.masked == rates.selected, f"{stage}: a span position is not [MASK]"
    elif rates.selected:
        n = rates.selected
        for observed, p, what in (
            (rates.masked, 0.8, "[MASK]"),
            (rates.unchanged, 0.1 + 0.1 / n_real, "unchanged (the random 10% included)"),
            (n - rates.masked - rates.unchanged, 0.1 * (n_real - 1) / n_real, "replaced"),
        ):
            five_sigma(observed / n, p, p * (1 - p) / n, f"{stage}: {what}")


def collect_rates(messages: list[dict], meta: dict) -> dict[str, StageRates]:
    """Per distinct stage (its JSON), the rows of every message that used it."""
    by_stage: dict[str, StageRates] = {}
    mask, ignore = meta["mask_token_id"], meta["label_ignore_value"]
    for message in messages:
        stage = meta["stages"][message["split"]][message["stage"]]
        key = json.dumps(stage, sort_keys=True)
        rates = by_stage.setdefault(key, StageRates(stage, meta["block_size"]))
        inputs, labels = message["tensors"]["input"][0], message["tensors"]["labels"][0]
        selected = labels != ignore
        rates.counts += selected.sum(axis=1).tolist()
        rates.shares += selected.mean(axis=1).tolist()
        rates.selected += int(selected.sum())
        rates.masked += int((inputs[selected] == mask).sum())
        rates.unchanged += int((inputs[selected] == labels[selected]).sum())
    return by_stage


# --- a live producer ----------------------------------------------------------------------------


def read_stream(client: redis.Redis, key: str, meta: dict, split: str) -> list[dict]:
    messages = []
    for _entry_id, fields in client.xrange(key):
        message = check_entry(fields, meta, split)
        assert is_canonical(fields[b"d"], meta), "not what the page says producers write"
        if split == "val":
            assert message["producer"] == 0
        messages.append(message)
    return messages


def check_char_diffusion(message: dict, meta: dict, corpus: str) -> None:
    """The producer's token rules, beyond what a consumer checks."""
    mask, ignore = meta["mask_token_id"], meta["label_ignore_value"]
    inputs, labels = message["tensors"]["input"][0], message["tensors"]["labels"][0]
    selected = labels != ignore
    assert not (inputs[~selected] == mask).any(), "[MASK] at an unselected position"
    for text in reconstruct(message, meta):
        assert "[MASK]" not in text and len(text) == meta["block_size"]
        assert text in corpus, f"reconstructed window is not in the corpus: {text!r}"


def check_sequences(messages: list[dict]) -> None:
    """``seq`` counts from 0 within (split, producer), in stream order."""
    by_producer: dict[int, list[int]] = defaultdict(list)
    for message in messages:
        by_producer[message["producer"]].append(message["seq"])
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
    assert meta["corpus_sha256"] == hashlib.sha256(corpus_path.read_bytes()).hexdigest()
    assert client.get(f"{ns}:val:done").decode() == meta["fingerprint"]

    train = read_stream(client, f"{ns}:train", meta, "train")
    val = read_stream(client, f"{ns}:val", meta, "val")
    assert len(train) >= backlog and len(val) == meta["val_batches"]
    for message in train + val:
        assert started - 1 <= message["t"] <= finished + 1, message["t"]
        check_char_diffusion(message, meta, corpus)
        check_mask_ratio(message, meta)
    check_sequences(train)
    check_sequences(val)
    for rates in collect_rates(train + val, meta).values():
        check_rates(rates, n_real=len(meta["itos"]) - 1)
    return meta, train, val


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_decode_shakespeare_char_diffusion(redis7, shakespeare, start_producer):
    """The reference preset: sticky, random (two ratios) and span stages."""
    args = [f"--redis_url={redis7.url}", "--preset=char_diffusion", "--val_batches=4"]
    meta, train, val = produce_and_decode(
        redis7.client(), start_producer, args, shakespeare, "wiretest", backlog=32
    )
    assert set(meta["schema"]) == {"input", "labels"}
    kinds = {meta["stages"][m["split"]][m["stage"]]["type"] for m in train + val}
    assert kinds == {"sticky", "random", "span"}


@pytest.mark.slow
def test_decode_non_ascii_corpus(redis7, tmp_path, start_producer):
    """No stages configured: one bernoulli stage at mask_probability."""
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
    assert meta["stages"]["train"] == [
        {"val_loss_stale_count": None, "type": "bernoulli", "masked_ratio": 0.15}
    ]


@pytest.mark.slow
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


@pytest.mark.slow
def test_selection_and_corruption_rates_of_every_stage_type(redis7, tmp_path, start_producer):
    """Enough rows of one stage of each type (about 1,000 each) for the page's formulas to
    be told apart from near misses; eight characters, so that the random tenth's draws of
    the original (1 in 8) show: 11.25% unchanged, not 10%."""
    corpus = tmp_path / "eight.txt"
    corpus.write_text("".join(random.Random(0).choices("abcdefg\n", k=30_000)))
    stages = [
        {"type": "random", "max_masked_ratio": 0.5},
        {
            "type": "sticky",
            "target_masked_ratio": 0.4,
            "p1_probability": 0.15,
            "p2_probability": 0.3,
        },
        {"type": "span", "spans_count": 4},
        {"type": "bernoulli", "masked_ratio": 0.15},
        {"type": "uniform", "min_ratio": 0.2},
    ]
    args = [
        f"--redis_url={redis7.url}",
        "--batch_size=64",
        "--block_size=128",
        "--val_batches=4",
        f"--unmasking_stages={json.dumps(stages)}",
    ]
    meta, train, _ = produce_and_decode(
        redis7.client(), start_producer, args, corpus, "wiretest4", backlog=80
    )
    rows = collect_rates(train, meta)
    assert sorted(rates.stage["type"] for rates in rows.values()) == sorted(
        s["type"] for s in stages
    )
    assert min(len(rates.counts) for rates in rows.values()) >= 64 * 80 // 5
