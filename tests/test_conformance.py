"""The conformance set (tests/vectors/, docs/wire-format.md "The conformance set") against
this project's own code: its decoder and checks reach every vector's expected outcome, the
real reader dead-letters every invalid one with its reason, the encoder writes the canonical
valid vectors byte for byte, the generator writes the committed files, and a producer
configured like the vectors writes the vectors' contract.

When the encoder's bytes or the generator's output change, this fails: a wire change must be
deliberate (docs/wire-format.md, format_version bumped where old consumers must refuse the new
messages), followed by ``python -m tests.vectors.generate`` and a commit of the new files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.producer.loop import contract_of
from services.producer.provider import load_provider
from shared.codec import (
    DEFAULT_MAX_BYTES,
    FORMAT_VERSION,
    CodecError,
    decode,
    encode,
    max_message_size,
)
from shared.contract import fingerprint, make_meta, schema_of
from shared.reader import BatchReader, read_validation
from shared.settings import ProducerConfig, load_settings
from shared.streams import StreamKeys
from shared.validation import REASONS, EntryValidator
from tests.vectors import generate

VECTORS = Path(__file__).resolve().parent / "vectors"
ROOT = VECTORS.parents[1]
INDEX = json.loads((VECTORS / "index.json").read_text(encoding="utf-8"))
META = json.loads((VECTORS / "meta.json").read_text(encoding="utf-8"))
CORPUS = (VECTORS / INDEX["corpus"]).read_bytes().decode("utf-8")
# Reasons that need more than the entry's bytes (and its stream) to reach.
NOT_FROM_BYTES = {"delivery_limit", "internal_error"}


def entry_fields(vector: dict) -> dict[bytes, bytes]:
    fields = {}
    for name, value in vector["entry"].items():
        if "file" in value:
            fields[name.encode()] = (VECTORS / value["file"]).read_bytes()
        else:
            fields[name.encode()] = base64.b64decode(value["base64"])
    return fields


def check(vector: dict):
    validator = EntryValidator(META, vector["stream"], DEFAULT_MAX_BYTES)
    return validator.check(entry_fields(vector))


def name(vector: dict) -> str:
    return vector["name"]


# ------------------------------------------------------------------ outcomes


@pytest.mark.parametrize("vector", INDEX["valid"], ids=name)
def test_valid_vector_decodes_to_its_content(vector):
    batch = check(vector)
    header = {
        "v": FORMAT_VERSION,
        "fp": batch.fingerprint,
        "split": batch.split,
        "stage": batch.stage,
        "producer": batch.producer,
        "seq": batch.seq,
        "t": batch.created,
    }
    assert header == vector["message"]
    assert META["stages"][batch.split][batch.stage]["type"] == vector["stage_type"]
    assert set(batch.tensors) == set(vector["tensors"])
    for tensor_name, want in vector["tensors"].items():
        array = batch.tensors[tensor_name]
        assert array.dtype.name == want["dtype"] and list(array.shape) == want["shape"]
        assert hashlib.sha256(array.tobytes()).hexdigest() == want["sha256"], tensor_name
    inputs, labels = batch.tensors["input"], batch.tensors["labels"]
    selected = labels != META["label_ignore_value"]
    original = np.where(selected, labels, inputs)
    rows = ["".join(META["itos"][i] for i in row) for row in original]
    assert rows == vector["rows"]
    assert all(row in CORPUS for row in rows)
    assert selected.sum(axis=1).tolist() == vector["selected_per_row"]


@pytest.mark.parametrize("vector", INDEX["invalid"], ids=name)
def test_invalid_vector_is_refused_with_its_reason(vector):
    with pytest.raises(CodecError) as refused:
        check(vector)
    assert refused.value.reason == vector["reason"], refused.value.detail


def test_every_reason_a_message_decides_has_vectors():
    covered = {vector["reason"] for vector in INDEX["invalid"]}
    assert covered == set(REASONS) - NOT_FROM_BYTES
    assert {vector["stream"] for vector in INDEX["invalid"]} == {"train", "val"}
    # Both kinds of valid vectors, and every stage type among the canonical ones.
    canonical = [v for v in INDEX["valid"] if v["canonical"]]
    assert canonical and len(canonical) < len(INDEX["valid"])
    assert {v["stage_type"] for v in canonical} == {
        "random",
        "sticky",
        "span",
        "bernoulli",
        "uniform",
    }
    # The mask ratio, in every valid vector (the schema has it), and refused out of [0, 1].
    assert all("mask_ratio" in v["tensors"] for v in INDEX["valid"])
    assert {"out_of_range-mask-ratio-above-1", "out_of_range-mask-ratio-nan"} <= {
        v["name"] for v in INDEX["invalid"]
    }


def test_the_reader_dead_letters_every_invalid_vector_with_its_reason(redis7):
    """The vectors as real stream entries: the training stream's through a consumer group
    (valid ones delivered, invalid ones dead-lettered, the stream left empty), the validation
    stream's through the non-consuming read (invalid ones skipped)."""
    client = redis7.client()
    keys = StreamKeys("conformance")
    vectors = INDEX["valid"] + INDEX["invalid"]
    ids = {}
    for vector in vectors:
        ids[vector["name"]] = client.xadd(keys.stream(vector["stream"]), entry_fields(vector))

    reader = BatchReader(
        client,
        keys,
        "g",
        "c",
        validator=EntryValidator(META, "train", DEFAULT_MAX_BYTES),
        dead_letter_maxlen=1000,
    )
    reader.setup()
    delivered = reader.read(count=len(vectors), block_ms=None)
    reader.ack([entry_id for entry_id, _ in delivered])
    train = [v for v in vectors if v["stream"] == "train"]
    assert {entry_id for entry_id, _ in delivered} == {
        ids[v["name"]] for v in train if "reason" not in v
    }
    dead = {fields[b"id"]: fields[b"reason"].decode() for _, fields in client.xrange(keys.dead)}
    assert dead == {ids[v["name"]]: v["reason"] for v in train if "reason" in v}
    assert client.xlen(keys.train) == 0, "acked and deleted, refused or not"

    skipped: list[str] = []
    batches = read_validation(
        client, keys, EntryValidator(META, "val", DEFAULT_MAX_BYTES), skipped.append
    )
    val = [v for v in vectors if v["stream"] == "val"]
    assert [(b.producer, b.seq) for b in batches] == [
        (v["message"]["producer"], v["message"]["seq"]) for v in val if "reason" not in v
    ]
    assert skipped == [v["reason"] for v in val if "reason" in v]
    assert client.xlen(keys.val) == len(val), "the validation stream is never consumed"


# ------------------------------------------------------------------ bytes


@pytest.mark.parametrize("vector", [v for v in INDEX["valid"] if v["canonical"]], ids=name)
def test_the_encoder_writes_the_canonical_vectors_byte_for_byte(vector):
    data = entry_fields(vector)[b"d"]
    assert encode(decode(data)) == data, (
        "the encoder's bytes changed: a wire change (docs/wire-format.md); bump "
        "format_version if old consumers cannot read them, then regenerate the vectors"
    )


def test_accepted_vectors_encode_to_the_canonical_form():
    """A consumer reads the non-canonical encodings as the same message: re-encoded (tensors
    in schema order), the key-order and wide-encoding vectors are the canonical vector of the
    same batch."""
    by_name = {v["name"]: entry_fields(v)[b"d"] for v in INDEX["valid"]}
    canonical = by_name["train-0-random"]
    for variant in ("accepted-key-order", "accepted-wide-encodings"):
        batch = decode(by_name[variant])
        batch = replace(batch, tensors={name: batch.tensors[name] for name in META["schema"]})
        assert by_name[variant] != canonical
        assert encode(batch) == canonical, variant


def test_the_generator_writes_the_committed_files():
    produced = generate.files()
    stale = [
        str(path.relative_to(VECTORS))
        for path in sorted(VECTORS.glob("*/*.msgpack"))
        if str(path.relative_to(VECTORS)) not in produced
    ]
    differ = [
        path
        for path, data in sorted(produced.items())
        if not (VECTORS / path).is_file() or (VECTORS / path).read_bytes() != data
    ]
    assert not stale and not differ, (
        f"tests/vectors/ is not what the generator writes now (differ: {differ}, stale: "
        f"{stale}): run python -m tests.vectors.generate and commit; if message bytes "
        "changed, that is a wire change (docs/wire-format.md)"
    )
    assert INDEX["format_version"] == FORMAT_VERSION == META["format_version"]


# ------------------------------------------------------------------ contract


def test_a_producer_configured_like_the_vectors_writes_their_contract():
    """Every field a producer writes, with the same values: so meta.json (and the page's
    list of fields, below) cannot fall behind the producer."""
    argv = [
        f"--{key}={json.dumps(value) if isinstance(value, list | bool) else value}"
        for key, value in generate.SETTINGS.items()
    ]
    argv.append(f"--corpus_path={VECTORS / generate.CORPUS_FILE}")
    settings = load_settings(argv, env={}, service=ProducerConfig)
    ours = make_meta(contract_of(settings, load_provider(settings)), "test")
    for key in ("created", "created_by"):
        assert key in ours
        ours.pop(key)
    stored = {k: v for k, v in META.items() if k not in ("created", "created_by")}
    assert ours == stored


def test_fingerprint_of_the_vectors_contract():
    assert fingerprint(META) == META["fingerprint"]
    canonical = (VECTORS / INDEX["contract_canonical"]).read_bytes()
    assert hashlib.sha256(canonical).hexdigest()[:16] == META["fingerprint"]
    # The trap the page warns about is in the set: a parser that reads 0.0 as the
    # integer 0 (JavaScript's JSON.parse) gets another fingerprint.
    text = (VECTORS / INDEX["meta"]).read_text(encoding="utf-8")
    lossy = json.loads(
        text, parse_float=lambda s: int(float(s)) if float(s) == int(float(s)) else float(s)
    )
    assert fingerprint(lossy) != META["fingerprint"]


def test_the_size_limit_of_the_vectors_contract():
    limit = max_message_size(schema_of(META))
    assert INDEX["max_message_bytes"] == limit
    oversized = [v for v in INDEX["invalid"] if v["reason"] == "oversized"]
    assert [len(entry_fields(v)[b"d"]) for v in oversized] == [limit + 1]
    longest_valid = max(len(entry_fields(v)[b"d"]) for v in INDEX["valid"])
    assert longest_valid <= limit


def test_the_page_names_every_meta_field_and_every_reason():
    page = (ROOT / "docs" / "wire-format.md").read_text(encoding="utf-8")
    contract = page.split("\n## The contract", 1)[1].split("\n## ", 1)[0]
    missing = [key for key in META if f"`{key}`" not in contract]
    for stage in META["stages"]["train"] + META["stages"]["val"]:
        missing += [key for key in stage if f"`{key}`" not in contract]
    assert not missing, f"docs/wire-format.md, 'The contract', does not list {missing}"
    # Every reason is named there as [`reason`], and nothing else is.
    checks = page.split("\n## What a consumer checks", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\[`(\w+)`\]", checks))
    assert named == set(REASONS), (
        f"'What a consumer checks' misses {sorted(set(REASONS) - named)} and names "
        f"{sorted(named - set(REASONS))}, which shared/validation.py does not have"
    )
