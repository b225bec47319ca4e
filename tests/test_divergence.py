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
from services.trainer.optim import MuonAdamW
from services.trainer.train import Dist, Progress, Trainer, TrainingDiverged
from shared.settings import TrainerConfig, load_settings


def guarded(tolerated: int, limit: int = 5) -> Trainer:
    """A trainer with only what the guard uses: settings, a model, an optimizer, a
    disabled loss scaler and the counters (``tolerated`` stands in for float16's)."""
    trainer = Trainer.__new__(Trainer)
    trainer.s = load_settings([f"--max_nonfinite_steps={limit}"], env={}, service=TrainerConfig)
    trainer.model = torch.nn.Linear(3, 2)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=False)
    trainer.d, trainer.progress = Dist(), Progress()
    trainer.ckpt_path = Path("runs/x/ckpt.pt")
    trainer._nonfinite_run = torch.zeros((), dtype=torch.long)
    trainer._nonfinite_total = torch.zeros((), dtype=torch.long)
    trainer._nonfinite_longest = torch.zeros((), dtype=torch.long)
    trainer._nonfinite_seen, trainer._tolerated = 0, tolerated
    trainer._checkpointed_iter = None
    return trainer


def step(trainer: Trainer, value: float) -> None:
    """One step whose loss is ``value`` times the model's output: NaN or inf makes every
    gradient non-finite."""
    trainer.optimizer.zero_grad()
    inputs = torch.ones(1, trainer.model.in_features)
    (trainer.model(inputs).sum() * value).backward()
    trainer._guard_gradient()
    trainer.progress.iter_num += 1


def counted() -> float:
    return metrics.NONFINITE_STEPS._value.get()


def test_a_non_finite_gradient_is_zeroed_and_a_finite_one_clipped():
    trainer = guarded(tolerated=0)
    step(trainer, math.nan)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in trainer.model.parameters())
    assert trainer._diverging() == "gradients"
    step(trainer, 1e6)  # finite: clipped to grad_clip (1.0), not zeroed
    norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])
    assert norm == pytest.approx(1.0, rel=1e-4)
    assert not trainer._diverging() and int(trainer._nonfinite_total) == 1


def test_without_a_loss_scaler_every_non_finite_step_counts_and_the_limit_stops():
    trainer = guarded(tolerated=0, limit=5)
    before = counted()
    for _ in range(4):
        step(trainer, math.inf)
    trainer._check_divergence()
    assert counted() - before == 4
    step(trainer, math.nan)
    with pytest.raises(TrainingDiverged, match=r"5 steps in a row \(up to iter 5\)"):
        trainer._check_divergence()


def test_a_streak_that_ends_between_two_reads_still_stops():
    trainer = guarded(tolerated=0, limit=5)
    for _ in range(6):
        step(trainer, math.nan)
    step(trainer, 1.0)  # over before the log interval's read
    with pytest.raises(TrainingDiverged, match="6 steps in a row"):
        trainer._check_divergence()


@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_a_zeroed_step_does_not_move_the_weights(kind):
    trainer = guarded(tolerated=0)
    trainer.model = torch.nn.Linear(8, 8, bias=False)
    if kind == "muon":
        trainer.optimizer = MuonAdamW(
            [{"params": list(trainer.model.parameters()), "kind": "muon", "lr": 0.02,
              "weight_decay": 0.0}],
            betas=(0.9, 0.99),
        )  # fmt: skip
    else:
        trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=0.02)
    for _ in range(3):  # momentum built up
        step(trainer, 1.0)
        trainer.optimizer.step()
    before = trainer.model.weight.detach().clone()
    step(trainer, math.nan)
    trainer.optimizer.step()
    moved = (trainer.model.weight.detach() - before).norm().item()
    assert moved < 1e-3 * before.norm().item()


def test_weights_that_overflow_are_not_checkpointed():
    trainer = guarded(tolerated=0)
    assert not trainer._diverging()
    with torch.no_grad():
        trainer.model.weight.fill_(1e30)  # finite, but the norm overflows float32
    assert trainer._diverging() == "weights"


def test_a_float16_overflow_streak_is_tolerated_then_counted():
    trainer = guarded(tolerated=10, limit=3)
    before = counted()
    for _ in range(10):
        step(trainer, math.inf)
    trainer._check_divergence()  # the scaler's own business: not counted, no stop
    assert counted() == before and not trainer._diverging()
    step(trainer, 1.0)  # a finite step ends the streak
    for _ in range(12):
        step(trainer, math.inf)
    trainer._check_divergence()
    assert counted() - before == 2 and trainer._diverging()
    step(trainer, math.inf)  # 3 beyond the tolerated 10
    with pytest.raises(TrainingDiverged):
        trainer._check_divergence()


def test_zero_never_stops():
    trainer = guarded(tolerated=0, limit=0)
    for _ in range(20):
        step(trainer, math.nan)
    trainer._check_divergence()
    assert trainer._diverging()
