"""Character-level masked diffusion batches: random windows of the corpus,
corrupted by the configured unmasking stages.

Tensors: ``input`` (corrupted window) and ``labels`` (original token at
selected positions, the dtype's largest value elsewhere), both (B, T) in the
smallest unsigned dtype that fits the vocabulary plus that sentinel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from services.producer.provider import Provider
from shared.codec import TensorSpec
from shared.corpus import corpus_of
from shared.masking import UniformStage, mask_windows_with_ratio
from shared.settings import ProducerConfig, SettingsError


class CharDiffusionProvider(Provider):
    name = "char_diffusion"

    def __init__(self, settings: ProducerConfig) -> None:
        super().__init__(settings)
        self.corpus = corpus_of(settings)
        self.tokenizer = self.corpus.tokenizer
        block = settings.block_size
        for split, ids in (("train", self.corpus.train), ("val", self.corpus.val)):
            if len(ids) < block:
                raise SettingsError(
                    f"block_size = {block}: the {split} split of corpus {self.corpus.name} has "
                    f"only {len(ids)} characters; use a smaller block_size or a larger corpus"
                )
        # Every window start, as views: sampling a batch is one gather of rows.
        self._windows = {
            "train": sliding_window_view(self.corpus.train, block),
            "val": sliding_window_view(self.corpus.val, block),
        }
        self._stages = {split: settings.stages(split) for split in ("train", "val")}
        self._with_ratio = any(
            isinstance(stage, UniformStage) for stages in self._stages.values() for stage in stages
        )

    def meta(self) -> dict[str, Any]:
        s, tok = self.settings, self.tokenizer
        return {
            "corpus": self.corpus.name,
            "corpus_sha256": self.corpus.sha256,
            "itos": tok.itos,
            "vocab_size": tok.vocab_size,
            "mask_token_id": tok.mask_id,
            "label_ignore_value": tok.ignore_value,
            "ignore_index": s.ignore_index,
            "batch_size": s.batch_size,
            "block_size": s.block_size,
            "train_val_split": s.train_val_split,
            "stages": {
                split: [stage.contract_entry() for stage in stages]
                for split, stages in self._stages.items()
            },
        }

    def schema(self) -> dict[str, TensorSpec]:
        shape = (self.settings.batch_size, self.settings.block_size)
        dtype = self.tokenizer.dtype.name
        schema = {"input": TensorSpec(dtype, shape), "labels": TensorSpec(dtype, shape)}
        if self._with_ratio:
            # Each row's mask ratio t, which the ELBO-weighted loss divides by.
            schema["mask_ratio"] = TensorSpec("float32", (self.settings.batch_size,))
        return schema

    def stage_count(self, split: str) -> int:
        return len(self._stages[split])

    def sample(self, rng: np.random.Generator, split: str, stage: int) -> dict[str, np.ndarray]:
        windows_view = self._windows[split]
        starts = rng.integers(0, windows_view.shape[0], size=self.settings.batch_size)
        windows = windows_view[starts]  # (B, T) copy
        inputs, labels, ratio = mask_windows_with_ratio(
            rng,
            windows,
            self._stages[split][stage],
            mask_id=self.tokenizer.mask_id,
            n_real=self.tokenizer.n_real,
            ignore_value=self.tokenizer.ignore_value,
            ratio=self._with_ratio,
        )
        if self._with_ratio:
            return {"input": inputs, "labels": labels, "mask_ratio": ratio}
        return {"input": inputs, "labels": labels}


PROVIDER = CharDiffusionProvider
