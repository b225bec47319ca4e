"""The baseline: batches made the way a single-machine torch pipeline makes them.

That pipeline samples a batch of windows with torch, masks each sequence in
a Python loop (a sticky stage also loops over its rounds, per sequence, with
torch ops on that sequence's 1-D tensor), applies the 80/10/10 BERT corruption
per sequence, builds int64 ``x`` / ``y`` (labels, -100 where not selected) and
a bool mask, and hands the batch on as a pickled ``.pt`` file in a directory
(a filesystem queue). This module re-creates that, with the same stages and
semantics as :mod:`shared.masking`, so the producer benchmark can measure what
our vectorized numpy + msgpack path replaces. It is deliberately *not*
optimized: being faithful to the old per-sample design is the point.

Only this module imports torch; the producer itself has no torch dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from shared.masking import (
    STICKY_MAX_ROUNDS,
    AnyStage,
    BernoulliStage,
    RandomStage,
    SpanStage,
    StickyStage,
    sticky_target,
)

IGNORE_INDEX = -100
TORCH_VERSION: str = torch.__version__

# One thread: the benchmark compares single-core throughput.
torch.set_num_threads(1)


class TorchReferenceProducer:
    """Makes and writes baseline batches; ``produce`` is one whole batch."""

    def __init__(
        self,
        text: str,
        stages: Sequence[AnyStage],
        *,
        batch_size: int,
        block_size: int,
        seed: int,
        train_val_split: float = 0.9,
    ) -> None:
        # A character vocabulary with [MASK] as the last id, like the reference.
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        self.data = ids[: int(len(ids) * train_val_split)]
        self.n_real = len(chars)
        self.mask_id = len(chars)
        self.stages = list(stages)
        self.batch_size, self.block_size = batch_size, block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.seq = 0

    # ------------------------------------------------------------- batches

    def produce(self, directory: Path) -> Path:
        """Make the next batch (stages in turn) and write it to ``directory``."""
        stage = self.seq % len(self.stages)
        batch = self.make_batch(stage)
        path = directory / f"batch_{self.seq:09d}.pt"
        torch.save(batch, path)
        self.seq += 1
        return path

    def make_batch(self, stage: int) -> dict[str, torch.Tensor]:
        """``{"x": inputs, "y": labels, "mask": selected}``, each (B, T)."""
        spec = self.stages[stage]
        starts = torch.randint(
            0, len(self.data) - self.block_size + 1, (self.batch_size,), generator=self.generator
        )
        xs, ys, masks = [], [], []
        for start in starts.tolist():
            sequence = self.data[start : start + self.block_size]
            selected = self._select(spec)
            x = self._corrupt(sequence, selected, outright=isinstance(spec, SpanStage))
            xs.append(x)
            ys.append(torch.where(selected, sequence, torch.full_like(sequence, IGNORE_INDEX)))
            masks.append(selected)
        return {"x": torch.stack(xs), "y": torch.stack(ys), "mask": torch.stack(masks)}

    # ----------------------------------------------------------- selection

    def _select(self, spec: AnyStage) -> torch.Tensor:
        length, g = self.block_size, self.generator
        if isinstance(spec, RandomStage):
            ratio = torch.rand(1, generator=g).item() * spec.max_masked_ratio
            return torch.rand(length, generator=g) < ratio
        if isinstance(spec, BernoulliStage):
            return torch.rand(length, generator=g) < spec.masked_ratio
        if isinstance(spec, StickyStage):
            return self._sticky(spec)
        return self._spans(spec.spans_count)

    def _sticky(self, spec: StickyStage) -> torch.Tensor:
        """Grow the selection round by round until exactly ceil(target * T)."""
        length, g = self.block_size, self.generator
        target = sticky_target(length, spec.target_masked_ratio)
        selected = torch.zeros(length, dtype=torch.bool)
        count = 0
        for _ in range(STICKY_MAX_ROUNDS):
            if count >= target:
                return selected
            new = self._sticky_round(spec, selected)
            need = target - count
            if new.numel() > need:  # truncate to exactly the target, at random
                new = new[torch.randperm(new.numel(), generator=g)[:need]]
            selected[new] = True
            count += new.numel()
        if count < target:  # pathological probabilities: finish uniformly
            free = (~selected).nonzero().squeeze(1)
            selected[free[torch.randperm(free.numel(), generator=g)[: target - count]]] = True
        return selected

    def _sticky_round(self, spec: StickyStage, selected: torch.Tensor) -> torch.Tensor:
        """Indices of the positions that join the selection in this round."""
        neighbour = torch.zeros(self.block_size, dtype=torch.bool)
        neighbour[1:] |= selected[:-1]
        neighbour[:-1] |= selected[1:]
        probability = torch.where(neighbour, spec.p2_probability, spec.p1_probability)
        joins = (torch.rand(self.block_size, generator=self.generator) < probability) & ~selected
        return joins.nonzero().squeeze(1)

    def _spans(self, spans_count: int) -> torch.Tensor:
        """Sorted uniform endpoints taken in pairs: disjoint spans [start, end)."""
        ends = torch.randint(0, self.block_size + 1, (2 * spans_count,), generator=self.generator)
        ends = ends.sort().values.tolist()
        selected = torch.zeros(self.block_size, dtype=torch.bool)
        for i in range(spans_count):
            selected[ends[2 * i] : ends[2 * i + 1]] = True
        return selected

    # ---------------------------------------------------------- corruption

    def _corrupt(
        self, sequence: torch.Tensor, selected: torch.Tensor, outright: bool
    ) -> torch.Tensor:
        """80% [MASK], 10% random real token, 10% unchanged (spans: all [MASK])."""
        x = sequence.clone()
        if outright:
            x[selected] = self.mask_id
            return x
        u = torch.rand(self.block_size, generator=self.generator)
        x[selected & (u < 0.8)] = self.mask_id
        swap = selected & (u >= 0.8) & (u < 0.9)
        x[swap] = torch.randint(
            0, self.n_real, (int(swap.sum()),), generator=self.generator, dtype=torch.long
        )
        return x


def check_batch(batch: dict[str, torch.Tensor], stage: AnyStage, mask_id: int) -> None:
    """Cheap invariants, so the benchmark never times a baseline that does less
    work than ours: shapes and dtypes, labels exactly where selected, exact
    sticky counts, spans fully masked."""
    x, y, mask = batch["x"], batch["y"], batch["mask"]
    if x.dtype != torch.long or y.dtype != torch.long or mask.dtype != torch.bool:
        raise AssertionError("baseline batch has the wrong dtypes")
    if not (x.shape == y.shape == mask.shape):
        raise AssertionError("baseline tensors differ in shape")
    if not torch.equal(y == IGNORE_INDEX, ~mask):
        raise AssertionError("baseline labels are not -100 exactly where unselected")
    if isinstance(stage, StickyStage):
        length = x.shape[1]
        target = sticky_target(length, stage.target_masked_ratio)
        if not bool((mask.sum(dim=1) == target).all()):
            raise AssertionError("baseline sticky selection misses its exact target")
    if isinstance(stage, SpanStage) and not bool((x[mask] == mask_id).all()):
        raise AssertionError("baseline spans are not all [MASK]")


class PerTokenReferenceProducer(TorchReferenceProducer):
    """The slowest faithful baseline: a torch provider that masks text in
    per-token Python loops (a sticky round visits every position and reads its
    random draw with ``.item()``; BERT corruption decides token by token).
    Same stages, semantics, tensors and ``.pt`` files as the parent."""

    def _sticky_round(self, spec: StickyStage, selected: torch.Tensor) -> torch.Tensor:
        length = self.block_size
        draws = torch.rand(length, generator=self.generator)
        joins = []
        for i in range(length):
            if selected[i]:
                continue
            neighbour = (i > 0 and bool(selected[i - 1])) or (
                i + 1 < length and bool(selected[i + 1])
            )
            threshold = spec.p2_probability if neighbour else spec.p1_probability
            if draws[i].item() < threshold:
                joins.append(i)
        return torch.tensor(joins, dtype=torch.long)

    def _corrupt(
        self, sequence: torch.Tensor, selected: torch.Tensor, outright: bool
    ) -> torch.Tensor:
        x = sequence.clone()
        for i in selected.nonzero().squeeze(1).tolist():
            if outright:
                x[i] = self.mask_id
                continue
            u = torch.rand(1, generator=self.generator).item()
            if u < 0.8:
                x[i] = self.mask_id
            elif u < 0.9:
                x[i] = int(torch.randint(0, self.n_real, (1,), generator=self.generator))
        return x
