import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from shared.masking import (
    BernoulliStage,
    RandomStage,
    SpanStage,
    Stage,
    StageCycle,
    StickyStage,
    _keep_at_most,
    mask_windows,
    select_random,
    select_spans,
    select_sticky,
    sticky_target,
)

MASK, N_REAL, IGNORE = 65, 65, 255

shapes = st.tuples(st.integers(1, 12), st.integers(2, 300))
seeds = st.integers(0, 2**32 - 1)
ratios = st.floats(0.01, 1.0)
probabilities = st.floats(0.01, 1.0)

sticky_stages = st.builds(
    StickyStage,
    type=st.just("sticky"),
    target_masked_ratio=ratios,
    p1_probability=probabilities,
    p2_probability=st.floats(0.0, 1.0),
)
random_stages = st.builds(RandomStage, type=st.just("random"), max_masked_ratio=ratios)
span_stages = st.builds(SpanStage, type=st.just("span"), spans_count=st.integers(1, 30))
bernoulli_stages = st.builds(BernoulliStage, type=st.just("bernoulli"), masked_ratio=ratios)
any_stage = st.one_of(sticky_stages, random_stages, span_stages, bernoulli_stages)


def windows_for(seed: int, shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, N_REAL, size=shape, dtype=np.uint8)


@settings(max_examples=150, deadline=None)
@given(seed=seeds, shape=shapes, stage=any_stage)
def test_labels_and_inputs_reconstruct_the_window(seed, shape, stage):
    windows = windows_for(seed, shape)
    inputs, labels = mask_windows(
        np.random.default_rng(seed),
        windows,
        stage,
        mask_id=MASK,
        n_real=N_REAL,
        ignore_value=IGNORE,
    )
    assert inputs.shape == labels.shape == shape and inputs.dtype == labels.dtype == np.uint8
    selected = labels != IGNORE
    np.testing.assert_array_equal(np.where(selected, labels, inputs), windows)
    # Positions that were not selected are untouched; the mask token appears
    # only at selected positions; random replacements are real characters.
    np.testing.assert_array_equal(inputs[~selected], windows[~selected])
    assert not (inputs[~selected] == MASK).any()
    assert (inputs[inputs != MASK] < N_REAL).all()
    if isinstance(stage, SpanStage):
        assert (inputs[selected] == MASK).all()


@settings(max_examples=150, deadline=None)
@given(seed=seeds, shape=shapes, stage=sticky_stages)
def test_sticky_selects_exactly_the_target_per_sequence(seed, shape, stage):
    selected = select_sticky(
        np.random.default_rng(seed),
        shape,
        stage.target_masked_ratio,
        stage.p1_probability,
        stage.p2_probability,
    )
    expected = math.ceil(stage.target_masked_ratio * shape[1] - 1e-9)
    assert (selected.sum(axis=1) == min(expected, shape[1])).all()


def test_sticky_target_rounding():
    assert sticky_target(1024, 0.4) == 410  # ceil(409.6)
    assert sticky_target(10, 0.5) == 5
    assert sticky_target(10, 0.51) == 6
    assert sticky_target(3, 1.0) == 3


def test_sticky_neighbours_cluster():
    """With p2 >> p1 selections form long runs; with p2 = 0 they do not."""
    rng = np.random.default_rng(0)

    def mean_run(p1, p2):
        sel = select_sticky(rng, (64, 1024), 0.4, p1, p2)
        starts = sel[:, 1:] & ~sel[:, :-1]
        return sel.sum() / (starts.sum() + sel[:, 0].sum())

    assert mean_run(0.05, 0.9) > 2 * mean_run(0.3, 0.0)


@settings(max_examples=100, deadline=None)
@given(seed=seeds, shape=shapes, count=st.integers(1, 30))
def test_spans_are_at_most_spans_count_runs(seed, shape, count):
    selected = select_spans(np.random.default_rng(seed), shape, count)
    runs = (selected[:, 1:] & ~selected[:, :-1]).sum(axis=1) + selected[:, 0]
    assert (runs <= count).all()


def test_span_coverage_is_about_half():
    selected = select_spans(np.random.default_rng(1), (512, 1024), 20)
    assert 0.45 < selected.mean() < 0.53


@given(seed=seeds, max_ratio=st.floats(0.05, 1.0))
@settings(max_examples=50, deadline=None)
def test_random_ratio_per_sequence_is_within_bound(seed, max_ratio):
    length = 4096
    selected = select_random(np.random.default_rng(seed), (32, length), max_ratio)
    fractions = selected.mean(axis=1)
    # Each row's own ratio is <= max_ratio; allow 6 sigma of binomial noise.
    assert (fractions <= max_ratio + 6 * math.sqrt(0.25 / length)).all()


def test_random_ratios_are_uniform_per_sequence():
    selected = select_random(np.random.default_rng(3), (4000, 512), 0.5)
    fractions = selected.mean(axis=1)
    assert abs(fractions.mean() - 0.25) < 0.01
    # Uniform on [0, 0.5]: a quarter of the rows below 0.125, a quarter above 0.375.
    assert abs((fractions < 0.125).mean() - 0.25) < 0.03
    assert abs((fractions > 0.375).mean() - 0.25) < 0.03


@pytest.mark.parametrize(
    "stage",
    [
        StickyStage(type="sticky", target_masked_ratio=0.6, p1_probability=0.1, p2_probability=0.5),
        RandomStage(type="random", max_masked_ratio=0.5),
        BernoulliStage(type="bernoulli", masked_ratio=0.15),
        RandomStage(type="random", max_masked_ratio=0.5, random_token_probability=0.0,
                    keep_probability=0.2),
        BernoulliStage(type="bernoulli", masked_ratio=0.3, random_token_probability=0.25,
                       keep_probability=0.05),
    ],
)  # fmt: skip
def test_bert_corruption_shares(stage):
    """80/10/10 by default, else the stage's own shares."""
    windows = windows_for(7, (256, 1024))
    inputs, labels = mask_windows(
        np.random.default_rng(7), windows, stage, mask_id=MASK, n_real=N_REAL, ignore_value=IGNORE
    )
    selected = labels != IGNORE
    n = selected.sum()
    masked = (inputs[selected] == MASK).mean()
    swapped = (inputs[selected] != windows[selected]).mean() - masked
    kept = (inputs[selected] == windows[selected]).mean()
    tol = 5 * math.sqrt(0.09 / n)
    swap_p, keep_p = stage.random_token_probability, stage.keep_probability
    assert abs(masked - (1 - swap_p - keep_p)) < tol
    # A random replacement equals the original with probability 1/N_REAL.
    assert abs(swapped - swap_p * (1 - 1 / N_REAL)) < tol
    assert abs(kept - (keep_p + swap_p / N_REAL)) < tol
    assert (labels[selected] == windows[selected]).all()  # every selected position labelled


def test_corruption_shares_must_leave_masks():
    with pytest.raises(ValidationError, match="leaves no selected position masked"):
        RandomStage(type="random", max_masked_ratio=0.5, random_token_probability=0.5,
                    keep_probability=0.5)  # fmt: skip
    with pytest.raises(ValidationError, match="keep_probability"):
        RandomStage(type="random", max_masked_ratio=0.5, keep_probability=-0.1)


def test_bernoulli_ratio():
    selected = (
        mask_windows(
            np.random.default_rng(0),
            windows_for(0, (64, 1024)),
            BernoulliStage(type="bernoulli", masked_ratio=0.15),
            mask_id=MASK,
            n_real=N_REAL,
            ignore_value=IGNORE,
        )[1]
        != IGNORE
    )
    assert abs(selected.mean() - 0.15) < 0.01


def test_same_rng_same_batch_different_rng_different_batch():
    stage = StickyStage(
        type="sticky", target_masked_ratio=0.4, p1_probability=0.15, p2_probability=0.3
    )
    windows = windows_for(0, (4, 128))
    kwargs = dict(mask_id=MASK, n_real=N_REAL, ignore_value=IGNORE)
    a = mask_windows(np.random.default_rng([1, 0, 2, 9]), windows, stage, **kwargs)
    b = mask_windows(np.random.default_rng([1, 0, 2, 9]), windows, stage, **kwargs)
    c = mask_windows(np.random.default_rng([1, 0, 3, 9]), windows, stage, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


@given(
    n=st.integers(1, 20),
    start=st.integers(0, 10_000),
    entropy=st.lists(st.integers(0, 2**31), min_size=1, max_size=3),
)
def test_stage_cycle_is_even_and_deterministic(n, start, entropy):
    cycle = StageCycle(n, entropy)
    first = start - start % n
    stages = [cycle.stage_for(seq) for seq in range(first, first + 3 * n)]
    for k in range(3):
        assert sorted(stages[k * n : (k + 1) * n]) == list(range(n))
    again = StageCycle(n, entropy)
    assert [again.stage_for(seq) for seq in range(first, first + 3 * n)] == stages


def test_stage_cycle_orders_differ_between_cycles():
    cycle = StageCycle(9, [1])
    orders = {tuple(cycle.stage_for(c * 9 + i) for i in range(9)) for c in range(20)}
    assert len(orders) > 15


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"type": "zigzag"}, "does not match any of the expected tags"),
        ({"type": "random"}, "max_masked_ratio"),
        (
            {
                "type": "sticky",
                "target_masked_ratio": 0.5,
                "p1_probability": 0.0,
                "p2_probability": 0.5,
            },
            "greater than 0",
        ),
        ({"type": "span", "spans_count": 0}, "greater than or equal to 1"),
        ({"type": "random", "max_masked_ratio": 1.5}, "less than or equal to 1"),
        (
            {"type": "random", "max_masked_ratio": 0.5, "val_loss_stale_count": 0},
            "greater than or equal to 1",
        ),
    ],
)
def test_invalid_stages_are_refused(value, message):
    with pytest.raises(ValidationError, match=message):
        TypeAdapter(Stage).validate_python(value)


class _TiedKeys:
    """A generator whose every draw is the same number: every key ties."""

    def random(self, shape, dtype=np.float64):
        return np.zeros(shape, dtype=dtype)


def test_trimming_keeps_exactly_the_limit_when_keys_tie():
    chosen = np.ones((3, 10), dtype=bool)
    limit = np.array([0, 4, 10])
    _keep_at_most(_TiedKeys(), chosen, limit)
    assert chosen.sum(axis=1).tolist() == [0, 4, 10]


def test_contract_lists_corruption_shares_only_when_set():
    """Default shares stay out of the contract (old contracts keep their
    bytes and fingerprint); set ones are listed and read back."""
    plain = RandomStage(type="random", max_masked_ratio=0.5)
    assert plain.contract_entry() == {
        "type": "random", "max_masked_ratio": 0.5, "val_loss_stale_count": None
    }  # fmt: skip
    tuned = RandomStage(type="random", max_masked_ratio=0.5, random_token_probability=0.0,
                        keep_probability=0.2)  # fmt: skip
    entry = tuned.contract_entry()
    assert entry["random_token_probability"] == 0.0 and entry["keep_probability"] == 0.2
    assert TypeAdapter(Stage).validate_python(entry) == tuned
    assert "keep_probability" not in SpanStage(type="span", spans_count=2).contract_entry()
