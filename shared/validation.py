"""Everything a consumer checks before a training step sees an entry.

The codec checks that a message is well formed (docs/wire-format.md, "A
message"); this module checks the entry against the run's dataset contract:
the entry's one field, the split of the stream it came from, the stage
range, and every token id. An entry that fails raises :class:`CodecError`
with a stable reason, which becomes its dead-letter reason and metric label.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.codec import Batch, CodecError, decode
from shared.contract import schema_of
from shared.masking import UniformStage
from shared.streams import PAYLOAD_FIELD

# Every reason an entry can be refused with, codec and contract checks
# together; docs/wire-format.md lists them with their meaning.
REASONS = (
    "bad_entry_fields",  # the entry's fields are not exactly {d}
    "oversized",  # longer than the schema allows, refused before parsing
    "malformed",  # not one msgpack value (or past a limit), fields missing, split unknown
    "wrong_type",  # the message, a field or a map key of the wrong type
    "duplicate_key",  # a map key twice
    "unknown_field",  # a top-level key the format does not define
    "unsupported_version",  # v is not 1
    "foreign_fingerprint",  # another dataset contract
    "out_of_range",  # negative or beyond-int64 stage/producer/seq, non-finite t
    "wrong_split",  # split differs from the stream's
    "bad_stage",  # stage beyond the split's stages
    "bad_dtype",  # a dtype the format does not know
    "bad_shape",  # a shape whose size disagrees with the bytes
    "schema_mismatch",  # tensors other than the schema's names, dtypes, shapes
    "bad_tokens",  # input ids at or beyond vocab_size
    "bad_labels",  # labels neither a real character id nor the ignore value
    "delivery_limit",  # valid, yet training steps failed on it max_deliveries times
    "internal_error",  # a check itself failed unexpectedly (the detail names it)
)


def _name(field: bytes | str) -> str:
    """A field name as text: UTF-8, other bytes as backslash escapes, at most 40 characters."""
    text = field.decode("utf-8", "backslashreplace") if isinstance(field, bytes) else field
    return text[:40]


class EntryValidator:
    """The checks of one stream (``split``) under one contract (``meta``)."""

    def __init__(self, meta: dict[str, Any], split: str, max_bytes: int) -> None:
        self.meta, self.split = meta, split
        self.fingerprint = str(meta["fingerprint"])
        self.schema = schema_of(meta)
        self.max_bytes = max_bytes
        self.n_stages = len(meta["stages"][split])
        # A uniform stage draws t from [min_ratio, 1]: a smaller t would let one
        # row's ELBO weight 1/(t*T) swamp the step. Compared in float32, the
        # dtype producers round t to (t = min_ratio exactly rounds the same way).
        self.min_ratio = {
            i: np.float32(stage.get("min_ratio", UniformStage.model_fields["min_ratio"].default))
            for i, stage in enumerate(meta["stages"][split])
            if stage.get("type") == "uniform"
        }
        # Token rules of a character vocabulary; a contract without them
        # (another dataset) gets the structural checks only.
        self.vocab_size: int | None = meta.get("vocab_size")
        self.mask_id: int | None = meta.get("mask_token_id")
        self.ignore_value: int | None = meta.get("label_ignore_value")

    def check(self, fields: dict[bytes, bytes]) -> Batch:
        """The entry's batch, or :class:`CodecError` naming what is wrong."""
        # Every name Redis sent (a repeated one too, see streams.EntryFields).
        names = getattr(fields, "names", None) or tuple(fields)
        if names != (PAYLOAD_FIELD,):
            shown = [_name(k) for k in names[:4]]
            raise CodecError(
                "bad_entry_fields",
                f"an entry has exactly one field 'd', this one has {len(names)}: {shown}",
            )
        batch = decode(
            fields[PAYLOAD_FIELD],
            fingerprint=self.fingerprint,
            schema=self.schema,
            max_bytes=self.max_bytes,
        )
        try:
            if batch.split != self.split:
                raise CodecError(
                    "wrong_split", f"split {batch.split!r} in the {self.split!r} stream"
                )
            if batch.stage >= self.n_stages:
                raise CodecError(
                    "bad_stage", f"stage {batch.stage}, the {self.split} split has {self.n_stages}"
                )
            self._check_tokens(batch.tensors, self.min_ratio.get(batch.stage, np.float32(0.0)))
        except CodecError as exc:
            exc.producer, exc.seq = batch.producer, batch.seq
            raise
        return batch

    def _check_tokens(self, tensors: dict[str, np.ndarray], low: np.float32) -> None:
        ratio = tensors.get("mask_ratio")
        # NaN fails both comparisons, so it is refused too.
        if ratio is not None and ratio.size and not bool(((ratio >= low) & (ratio <= 1.0)).all()):
            stage = f"this uniform stage's min_ratio {float(low):g}" if low else "0"
            raise CodecError("out_of_range", f"mask_ratio holds values below {stage} or above 1")
        if self.vocab_size is None:
            return
        inputs, labels = tensors.get("input"), tensors.get("labels")
        if inputs is not None and inputs.size:
            low, high = int(inputs.min()), int(inputs.max())
            if low < 0 or high >= self.vocab_size:
                raise CodecError(
                    "bad_tokens",
                    f"input holds ids {low}..{high}, the vocabulary has {self.vocab_size}",
                )
        if labels is not None and labels.size and self.ignore_value is not None:
            real = (labels >= 0) & (labels < self.vocab_size) & (labels != self.mask_id)
            bad = ~(real | (labels == self.ignore_value))
            if bad.any():
                value = int(labels[bad].flat[0])
                raise CodecError(
                    "bad_labels",
                    f"label {value} is neither a character id below {self.vocab_size} "
                    f"(other than [MASK] = {self.mask_id}) nor the ignore value "
                    f"{self.ignore_value}",
                )
