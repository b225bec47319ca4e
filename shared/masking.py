"""Masking stages and the vectorized corruption of token windows.

A *stage* says which positions of a window are selected for prediction; the
selected positions are then corrupted BERT-style (by default 80% ``[MASK]``,
10% a random real token, 10% unchanged; a stage may set other shares), except
for ``span`` and ``uniform`` stages, which replace their selection by
``[MASK]`` outright. Everything here works on whole ``(B, T)`` arrays; the only
Python loop is over the rounds of a sticky stage, never over tokens or
sequences.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# A sticky stage grows its selection in rounds; with tiny p1/p2 that can take
# many rounds, so after this many the remainder is chosen uniformly at random.
STICKY_MAX_ROUNDS = 256


class _Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Plateau patience for the trainer: evaluations without improvement of the
    # validation loss before it advances to the next stage.
    val_loss_stale_count: int | None = Field(default=None, ge=1)

    def contract_entry(self) -> dict:
        """The stage as the dataset contract lists it (JSON values)."""
        return self.model_dump(mode="json")


class _CorruptedStage(_Stage):
    """A stage whose selected positions are corrupted BERT-style: each becomes a
    random real token with random_token_probability, stays unchanged with
    keep_probability, and is replaced by ``[MASK]`` otherwise (80/10/10 by
    default). Every selected position is labelled, whatever its input."""

    random_token_probability: float = Field(0.1, ge=0.0, le=1.0)
    keep_probability: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _some_positions_masked(self) -> _CorruptedStage:
        total = self.random_token_probability + self.keep_probability
        if total >= 1.0:
            raise ValueError(
                f"random_token_probability + keep_probability = {total:g} leaves no selected "
                "position masked; keep their sum below 1 (the default is 0.1 + 0.1)"
            )
        return self

    def contract_entry(self) -> dict:
        """Shares at their 80/10/10 defaults are left out, so contracts of
        stages that do not set them are the same bytes as before they existed
        (and so keep their fingerprint)."""
        entry = super().contract_entry()
        for name in ("random_token_probability", "keep_probability"):
            if entry[name] == 0.1:
                del entry[name]
        return entry


class RandomStage(_CorruptedStage):
    """Each sequence draws a ratio uniformly in [0, max_masked_ratio] and selects
    every position independently with that probability."""

    type: Literal["random"]
    max_masked_ratio: float = Field(gt=0.0, le=1.0)


class BernoulliStage(_CorruptedStage):
    """Every position is selected independently with masked_ratio (classic BERT;
    what a run without configured stages uses, with mask_probability)."""

    type: Literal["bernoulli"]
    masked_ratio: float = Field(gt=0.0, le=1.0)


class StickyStage(_CorruptedStage):
    """Selection grows in rounds: a position next to a selected one joins with
    p2_probability, any other with p1_probability, until each sequence holds
    exactly ceil(target_masked_ratio * length) selected positions."""

    type: Literal["sticky"]
    target_masked_ratio: float = Field(gt=0.0, le=1.0)
    p1_probability: float = Field(gt=0.0, le=1.0)
    p2_probability: float = Field(ge=0.0, le=1.0)


class SpanStage(_Stage):
    """spans_count disjoint contiguous spans, replaced by [MASK] outright. The
    2*spans_count span ends are uniform over the window, so on average about
    half of the window is masked."""

    type: Literal["span"]
    spans_count: int = Field(ge=1)


class UniformStage(_Stage):
    """Continuous-time masked diffusion, the stage that trains on the ELBO:
    each row draws its own ratio t from [min_ratio, 1] and replaces every
    position by [MASK] with probability t ([MASK] only, no 80/10/10). The
    draws are stratified: row i's t lies in the i-th of B equal slices of
    [min_ratio, 1], and the rows are then shuffled. Batches of a contract with
    such a stage carry each row's t as the ``mask_ratio`` tensor."""

    type: Literal["uniform"]
    min_ratio: float = Field(1e-3, gt=0.0, lt=1.0)


AnyStage = RandomStage | BernoulliStage | StickyStage | SpanStage | UniformStage
Stage = Annotated[AnyStage, Field(discriminator="type")]


# ---------------------------------------------------------------- selection


def select_random(rng: np.random.Generator, shape: tuple[int, int], max_ratio: float) -> np.ndarray:
    ratios = rng.random(shape[0], dtype=np.float32) * np.float32(max_ratio)
    return rng.random(shape, dtype=np.float32) < ratios[:, None]


def sticky_target(length: int, target_ratio: float) -> int:
    """Number of positions a sticky stage selects in a window of ``length``."""
    # The tiny epsilon keeps 0.4 * 1024 = 409.6000000000001 from becoming 410.
    return min(length, math.ceil(target_ratio * length - 1e-9))


def select_sticky(
    rng: np.random.Generator, shape: tuple[int, int], target_ratio: float, p1: float, p2: float
) -> np.ndarray:
    batch, length = shape
    target = sticky_target(length, target_ratio)
    selected = np.zeros(shape, dtype=bool)
    need = np.full(batch, target, dtype=np.int64)
    neighbour = np.empty(shape, dtype=bool)
    p1_, p2_ = np.float32(p1), np.float32(p2)
    for _ in range(STICKY_MAX_ROUNDS):
        if not need.any():
            return selected
        neighbour[:, 1:] = selected[:, :-1]
        neighbour[:, 0] = False
        neighbour[:, :-1] |= selected[:, 1:]
        threshold = np.where(neighbour, p2_, p1_)
        joins = rng.random(shape, dtype=np.float32) < threshold
        joins &= ~selected
        joins &= (need > 0)[:, None]
        _keep_at_most(rng, joins, need)
        selected |= joins
        need -= joins.sum(axis=1)
    # Pathological probabilities: finish the remaining positions uniformly.
    free = ~selected
    _keep_at_most(rng, free, need)
    return selected | free


def _keep_at_most(rng: np.random.Generator, chosen: np.ndarray, limit: np.ndarray) -> None:
    """Clear entries of ``chosen`` (in place, uniformly at random) so that row i
    keeps at most ``limit[i]`` of them."""
    counts = chosen.sum(axis=1)
    rows = np.flatnonzero(counts > limit)
    if rows.size == 0:
        return
    sub = chosen[rows]
    keys = rng.random(sub.shape, dtype=np.float32)
    keys[~sub] = 2.0  # never kept
    # Keep the limit[i] smallest keys by rank, not by comparing with a cut-off
    # value: float32 keys tie now and then, and a tie must not keep one more.
    order = np.argsort(keys, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(sub.shape[1])[None, :], axis=1)
    chosen[rows] = sub & (rank < limit[rows][:, None])


def select_spans(rng: np.random.Generator, shape: tuple[int, int], spans_count: int) -> np.ndarray:
    batch, length = shape
    # Sorted endpoints taken in pairs give disjoint spans [start, end).
    ends = np.sort(rng.integers(0, length + 1, size=(batch, 2 * spans_count)), axis=1)
    offsets = (np.arange(batch) * (length + 1))[:, None]
    size = batch * (length + 1)
    delta = np.bincount((ends[:, 0::2] + offsets).ravel(), minlength=size).astype(np.int32)
    delta -= np.bincount((ends[:, 1::2] + offsets).ravel(), minlength=size).astype(np.int32)
    return np.cumsum(delta.reshape(batch, length + 1)[:, :length], axis=1) > 0


def select_uniform(
    rng: np.random.Generator, shape: tuple[int, int], min_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """(selected, t): stratified per-row ratios t in [min_ratio, 1], then each
    position selected with its row's t."""
    batch = shape[0]
    strata = (np.arange(batch) + rng.random(batch)) / batch  # one draw per slice of [0, 1)
    t = (min_ratio + (1.0 - min_ratio) * rng.permutation(strata)).astype(np.float32)
    return rng.random(shape, dtype=np.float32) < t[:, None], t


def select(rng: np.random.Generator, shape: tuple[int, int], stage: AnyStage) -> np.ndarray:
    if isinstance(stage, UniformStage):
        return select_uniform(rng, shape, stage.min_ratio)[0]
    if isinstance(stage, RandomStage):
        return select_random(rng, shape, stage.max_masked_ratio)
    if isinstance(stage, BernoulliStage):
        return rng.random(shape, dtype=np.float32) < np.float32(stage.masked_ratio)
    if isinstance(stage, StickyStage):
        return select_sticky(
            rng, shape, stage.target_masked_ratio, stage.p1_probability, stage.p2_probability
        )
    return select_spans(rng, shape, stage.spans_count)


# --------------------------------------------------------------- corruption


def corrupt_bert(
    rng: np.random.Generator,
    windows: np.ndarray,
    selected: np.ndarray,
    mask_id: int,
    n_real: int,
    random_token_probability: float = 0.1,
    keep_probability: float = 0.1,
) -> np.ndarray:
    """Selected positions become ``mask_id`` with probability
    1 - random_token_probability - keep_probability, a random real token (ids
    ``0..n_real-1``, so never the mask) with random_token_probability, and stay
    unchanged otherwise (80/10/10 by default)."""
    u = rng.random(windows.shape, dtype=np.float32)
    mask_p = np.float32(1.0 - random_token_probability - keep_probability)
    swap_p = np.float32(1.0 - keep_probability)
    inputs = np.where(selected & (u < mask_p), windows.dtype.type(mask_id), windows)
    swap = selected & (u >= mask_p) & (u < swap_p)
    inputs[swap] = rng.integers(0, n_real, size=int(swap.sum()), dtype=windows.dtype)
    return inputs


def mask_windows(
    rng: np.random.Generator,
    windows: np.ndarray,
    stage: AnyStage,
    *,
    mask_id: int,
    n_real: int,
    ignore_value: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt ``windows`` (B, T) with ``stage``; return (inputs, labels).

    Labels hold the original token at selected positions and ``ignore_value``
    elsewhere, so ``where(labels != ignore_value, labels, inputs)`` is the
    original window.
    """
    inputs, labels, _ratio = mask_windows_with_ratio(
        rng, windows, stage, mask_id=mask_id, n_real=n_real, ignore_value=ignore_value, ratio=False
    )
    return inputs, labels


def mask_windows_with_ratio(
    rng: np.random.Generator,
    windows: np.ndarray,
    stage: AnyStage,
    *,
    mask_id: int,
    n_real: int,
    ignore_value: int,
    ratio: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`mask_windows`, plus each row's mask ratio (float32, (B,)): the
    drawn t of a ``uniform`` stage, else the share of the row selected (None
    with ``ratio=False``, which skips computing it)."""
    if isinstance(stage, UniformStage):
        selected, t = select_uniform(rng, windows.shape, stage.min_ratio)
    else:
        selected = select(rng, windows.shape, stage)
        t = selected.mean(axis=1, dtype=np.float32) if ratio else None
    if isinstance(stage, SpanStage | UniformStage):
        inputs = np.where(selected, windows.dtype.type(mask_id), windows)
    else:
        inputs = corrupt_bert(
            rng,
            windows,
            selected,
            mask_id,
            n_real,
            stage.random_token_probability,
            stage.keep_probability,
        )
    labels = np.where(selected, windows, windows.dtype.type(ignore_value))
    return inputs, labels, t


# ------------------------------------------------------------ stage choice


class StageCycle:
    """Spreads batches evenly over ``n`` stages: sequence numbers are cut into
    cycles of ``n`` and each cycle visits every stage once, in an order shuffled
    deterministically from ``entropy`` and the cycle number."""

    def __init__(self, n: int, entropy: list[int]) -> None:
        if n < 1:
            raise ValueError("StageCycle needs at least one stage")
        self.n = n
        self._entropy = list(entropy)
        self._cycle = -1
        self._order = np.arange(n)

    def stage_for(self, seq: int) -> int:
        cycle, slot = divmod(seq, self.n)
        if cycle != self._cycle:
            self._order = np.random.default_rng([*self._entropy, cycle]).permutation(self.n)
            self._cycle = cycle
        return int(self._order[slot])
