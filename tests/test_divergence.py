"""The trainer's guard against non-finite gradients, step by step on a small module:
zeroed on the device, counted beyond the streak a float16 loss scaler skips by design,
no checkpoint during a streak, and a stop after ``max_nonfinite_steps`` in a row. (The
whole path, from a diverging run to exit 2 with the last finite checkpoint kept, runs in
tests/test_trainer.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from services.trainer import metrics
from services.trainer.guard import DivergenceGuard, TrainingDiverged
from services.trainer.optim import MuonAdamW


class CountingGuard(DivergenceGuard):
    """A guard that knows its iteration, as the training loop does."""

    iter_num = 0


def guarded(
    tolerated: int, limit: int = 5, model: torch.nn.Module | None = None, optimizer=None
) -> CountingGuard:
    """A guard over a small module and SGD (or ``optimizer``), with a disabled loss scaler;
    ``tolerated`` stands in for float16's streak."""
    model = model or torch.nn.Linear(3, 2)
    guard = CountingGuard(
        model,
        optimizer or torch.optim.SGD(model.parameters(), lr=0.1),
        torch.amp.GradScaler("cpu", enabled=False),
        grad_clip=1.0,
        max_nonfinite_steps=limit,
        ckpt_path=Path("runs/x/ckpt.pt"),
        checkpointed_iter=None,
        announce=True,
    )
    guard.tolerated = tolerated
    return guard


def step(guard: CountingGuard, value: float) -> None:
    """One step whose loss is ``value`` times the model's output: NaN or inf makes every
    gradient non-finite."""
    guard.optimizer.zero_grad()
    inputs = torch.ones(1, guard.model.in_features)
    (guard.model(inputs).sum() * value).backward()
    guard.step()
    guard.iter_num += 1


def check(guard: CountingGuard) -> None:
    guard.check(guard.iter_num)


def diverging(guard: CountingGuard) -> str | None:
    return guard.blocks_checkpoint(guard.iter_num)


def counted() -> float:
    return metrics.NONFINITE_STEPS._value.get()


def test_a_non_finite_gradient_is_zeroed_and_a_finite_one_clipped():
    guard = guarded(tolerated=0)
    step(guard, math.nan)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in guard.model.parameters())
    assert diverging(guard) == "gradients"
    step(guard, 1e6)  # finite: clipped to grad_clip (1.0), not zeroed
    norm = torch.nn.utils.get_total_norm([p.grad for p in guard.model.parameters()])
    assert norm == pytest.approx(1.0, rel=1e-4)
    assert not diverging(guard) and int(guard.total) == 1


def test_without_a_loss_scaler_every_non_finite_step_counts_and_the_limit_stops():
    guard = guarded(tolerated=0, limit=5)
    before = counted()
    for _ in range(4):
        step(guard, math.inf)
    check(guard)
    assert counted() - before == 4
    step(guard, math.nan)
    with pytest.raises(TrainingDiverged, match=r"5 steps in a row \(up to iter 5\)"):
        check(guard)


def test_a_streak_that_ends_between_two_reads_still_stops():
    guard = guarded(tolerated=0, limit=5)
    for _ in range(6):
        step(guard, math.nan)
    step(guard, 1.0)  # over before the log interval's read
    with pytest.raises(TrainingDiverged, match="6 steps in a row"):
        check(guard)


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_a_zeroed_step_does_not_move_the_weights(kind):
    model = torch.nn.Linear(8, 8, bias=False)
    if kind == "muon":
        optimizer = MuonAdamW(
            [{"params": list(model.parameters()), "kind": "muon", "lr": 0.02,
              "weight_decay": 0.0}],
            betas=(0.9, 0.99),
        )  # fmt: skip
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.02)
    guard = guarded(tolerated=0, model=model, optimizer=optimizer)
    for _ in range(3):  # momentum built up
        step(guard, 1.0)
        guard.optimizer.step()
    before = guard.model.weight.detach().clone()
    step(guard, math.nan)
    guard.optimizer.step()
    moved = (guard.model.weight.detach() - before).norm().item()
    assert moved < 1e-3 * before.norm().item()


def test_weights_that_overflow_are_not_checkpointed():
    guard = guarded(tolerated=0)
    assert not diverging(guard)
    with torch.no_grad():
        guard.model.weight.fill_(1e30)  # finite, but the norm overflows float32
    assert diverging(guard) == "weights"


def test_a_float16_overflow_streak_is_tolerated_then_counted():
    guard = guarded(tolerated=10, limit=3)
    before = counted()
    for _ in range(10):
        step(guard, math.inf)
    check(guard)  # the scaler's own business: not counted, no stop
    assert counted() == before and not diverging(guard)
    step(guard, 1.0)  # a finite step ends the streak
    for _ in range(12):
        step(guard, math.inf)
    check(guard)
    assert counted() - before == 2 and diverging(guard)
    step(guard, math.inf)  # 3 beyond the tolerated 10
    with pytest.raises(TrainingDiverged):
        check(guard)


def test_zero_never_stops():
    guard = guarded(tolerated=0, limit=0)
    for _ in range(20):
        step(guard, math.nan)
    check(guard)
    assert diverging(guard)
