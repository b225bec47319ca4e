"""The trainer's pure pieces: learning-rate schedule and plateau stage control."""

import itertools
import math

import pytest

from services.trainer.train import StageState, learning_rate
from shared.settings import load_settings

S = load_settings(["--preset=char_diffusion"], env={})


def test_warmup_is_linear_then_cosine_decays_to_min_lr():
    assert learning_rate(0, S) == pytest.approx(S.learning_rate / (S.warmup_iters + 1))
    assert learning_rate(249, S) == pytest.approx(S.learning_rate * 250 / 501)
    assert learning_rate(S.warmup_iters, S) == pytest.approx(S.learning_rate)
    middle = (S.warmup_iters + S.lr_decay_iters) // 2
    assert learning_rate(middle, S) == pytest.approx((S.learning_rate + S.min_lr) / 2, rel=1e-3)
    assert learning_rate(S.lr_decay_iters, S) == S.min_lr
    assert learning_rate(S.lr_decay_iters + 500, S) == S.min_lr
    rates = [learning_rate(i, S) for i in range(S.warmup_iters, S.lr_decay_iters)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_stage_advances_after_patience_without_improvement():
    stage = StageState()
    assert not stage.update(3.0, patience=2, n_stages=3)  # best so far
    assert not stage.update(2.5, patience=2, n_stages=3)  # improved
    assert not stage.update(2.6, patience=2, n_stages=3)  # stale 1
    assert stage.update(2.55, patience=2, n_stages=3)  # stale 2: next stage
    assert (stage.active, stage.best, stage.stale) == (1, math.inf, 0)
    # The new stage starts its own record.
    assert not stage.update(2.9, patience=2, n_stages=3)
    assert stage.best == 2.9


def test_last_stage_and_missing_patience_never_advance():
    stage = StageState(active=2)
    for loss in (1.0, 2.0, 3.0, 4.0):
        assert not stage.update(loss, patience=1, n_stages=3)
    assert stage.active == 2
    stage = StageState()
    for loss in (1.0, 2.0, 3.0, 4.0):
        assert not stage.update(loss, patience=None, n_stages=3)
    assert stage.active == 0
