"""The arithmetic of ``bench-quality --curve``: equal-quality budgets."""

from __future__ import annotations

import math

import pytest

from benchmarks.bench_quality import budget_args, equal_quality_tokens

CURVE = [(1000, 3.0), (2000, 2.5), (4000, 2.2), (8000, 2.2), (16000, 1.8)]


def test_a_measured_point_gives_its_own_budget():
    assert equal_quality_tokens(CURVE, 2.5) == pytest.approx(2000)
    assert equal_quality_tokens(CURVE, 3.0) == pytest.approx(1000)
    assert equal_quality_tokens(CURVE, 1.8) == pytest.approx(16000)


def test_between_two_points_the_budget_is_interpolated_in_log_tokens():
    # Halfway from 3.0 to 2.5 is halfway from log 1000 to log 2000: sqrt(2) x 1000.
    assert equal_quality_tokens(CURVE, 2.75) == pytest.approx(1000 * math.sqrt(2))
    # A flat stretch gives its first budget, the least that reaches that quality.
    assert equal_quality_tokens(CURVE, 2.2) == pytest.approx(4000)


def test_outside_the_measured_curve_there_is_no_answer():
    assert equal_quality_tokens(CURVE, 3.1) is None
    assert equal_quality_tokens(CURVE, 1.7) is None


def test_each_budget_has_its_own_whole_schedule():
    args = dict(a[2:].split("=") for a in budget_args(125))
    assert args == {"max_iters": "125", "lr_decay_iters": "125", "warmup_iters": "25",
                    "eval_interval": "125", "checkpoint_interval": "125"}  # fmt: skip
    assert dict(a[2:].split("=") for a in budget_args(1000))["warmup_iters"] == "50"
