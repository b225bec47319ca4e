"""The autoscaler policy (services/autoscaler/policy.py): every reason, properties under
arbitrary and closed-loop signals, and the simulation (services/autoscaler/simulation.py)
that benchmarks/bench_autoscaler.py reports."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from services.autoscaler.policy import (
    ABOVE_MAX,
    AT_MAX,
    AT_MIN,
    BELOW_MIN,
    CHANGES,
    CONFIRMING,
    COOLDOWN,
    HOLD,
    NO_SIGNAL,
    QUEUE_FULL,
    REASONS,
    STARVING,
    Decision,
    PolicyConfig,
    PolicyState,
    Signals,
    decide,
)
from services.autoscaler.simulation import Change, SimParams, flapped, run_all

CONFIG = PolicyConfig()  # min 1, max 8, cooldown 30 s, headroom 1.2, confirm 2
BACKLOG = 256
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def signals(
    t: float = 100.0,
    producers: int = 4,
    wait: float = 0.0,
    consumed: float = 300.0,
    produced: float = 300.0,
    queue: int | None = 250,
    backlog: int | None = BACKLOG,
    backpressure: float = 0.25,
) -> Signals:
    """Defaults: 4 producers of 100/s feeding 300/s, fed, queue full, 25% backpressure."""
    return Signals(t, producers, wait, consumed, produced, queue, backlog, backpressure)


def starving(t: float, producers: int, demand: float, rate: float = 100.0) -> Signals:
    """Producers making ``rate`` each, all of it eaten, trainers wanting ``demand``."""
    capacity = producers * rate
    return signals(t, producers, 1 - capacity / demand, capacity, capacity, 0, BACKLOG, 0.0)


def idle(t: float, producers: int, demand: float, rate: float = 100.0) -> Signals:
    """Trainers fed at ``demand``, queue at its bound, producers blocked for the surplus."""
    capacity = producers * rate
    return signals(t, producers, 0.0, demand, demand, BACKLOG, BACKLOG, 1 - demand / capacity)


def run(observations: list[Signals], config: PolicyConfig = CONFIG) -> list[Decision]:
    state, out = PolicyState(), []
    for s in observations:
        decision = decide(s, config, state)
        state = decision.state
        out.append(decision)
    return out


# ------------------------------------------------------------------------- each reason


def test_starving_sizes_the_step_from_measured_rates():
    # 2 producers x 100/s all eaten, trainers waiting 5/9 of the time: demand 450/s,
    # x 1.2 headroom / 100 per producer = 5.4 -> 6, in one step (not 3)
    first, second = run([starving(0, 2, 450), starving(5, 2, 450)])
    assert (first.desired, first.reason) == (2, CONFIRMING)
    assert (second.desired, second.reason) == (6, STARVING)
    assert second.demand_per_s == pytest.approx(450)
    assert second.producer_rate_per_s == pytest.approx(100)
    assert second.state == PolicyState(last_change_s=5)


def test_starving_adds_at_least_one_even_when_rates_say_enough():
    # 6% data wait at 370/s consumed: demand 393.6/s, which 4 x 100/s (headroom 1.0) covers
    # on paper; the trainers still wait, so one more replica all the same
    config = replace(CONFIG, headroom=1.0, confirm=1)
    s = signals(producers=4, wait=0.06, consumed=370, produced=400, queue=0, backpressure=0)
    decision = decide(s, config, PolicyState())
    assert decision.demand_per_s == pytest.approx(370 / 0.94)  # 393.6 < 4 x 100
    assert (decision.desired, decision.reason) == (5, STARVING)


def test_starving_without_a_producer_rate_steps_by_one():
    config = replace(PolicyConfig(min_producers=0), confirm=1)
    # no producer running: its rate series are absent (NaN) and must not block the decision
    s = signals(producers=0, wait=1.0, consumed=0, produced=math.nan, queue=0)
    s = replace(s, backpressure_share=math.nan)
    assert decide(s, config, PolicyState()).desired == 1
    assert decide(s, config, PolicyState()).reason == STARVING


def test_at_max_when_starving_with_every_replica_running():
    decision = run([starving(0, 8, 2000), starving(5, 8, 2000)])[-1]
    assert (decision.desired, decision.reason) == (8, AT_MAX)
    capped = run([starving(0, 6, 2000), starving(5, 6, 2000)])[-1]
    assert (capped.desired, capped.reason) == (8, STARVING)


def test_queue_full_sizes_the_step_down_from_the_unconstrained_rate():
    # 6 producers blocked 5/6 of the time: unconstrained 100/s each; 100 x 1.2 / 100 -> 2
    first, second = run([idle(0, 6, 100), idle(5, 6, 100)])
    assert (first.desired, first.reason) == (6, CONFIRMING)
    assert (second.desired, second.reason) == (2, QUEUE_FULL)
    assert second.producer_rate_per_s == pytest.approx(100)


def test_queue_full_holds_when_fewer_would_not_cover_demand_with_headroom():
    # 2 x 100 for 100/s: backpressure 50% (idle enough), but 1 x 100 < 100 x 1.2
    decision = run([idle(0, 2, 100), idle(5, 2, 100), idle(10, 2, 100)])[-1]
    assert (decision.desired, decision.reason) == (2, HOLD)


def test_queue_full_with_no_reader_keeps_the_minimum_only():
    s = replace(idle(0, 5, 100), consumed_per_s=0.0, produced_per_s=0.0, backpressure_share=1.0)
    decision = run([s, replace(s, time_s=5)])[-1]
    assert (decision.desired, decision.reason) == (1, QUEUE_FULL)


def test_at_min_when_idle_with_the_minimum_running():
    decision = run([idle(0, 1, 10), idle(5, 1, 10)])[-1]
    assert (decision.desired, decision.reason) == (1, AT_MIN)


def test_cooldown_delays_a_confirmed_change_then_lets_it_through():
    state = PolicyState(last_change_s=0.0)
    in_cooldown = decide(starving(29.9, 2, 450), replace(CONFIG, confirm=1), state)
    assert (in_cooldown.desired, in_cooldown.reason) == (2, COOLDOWN)
    after = decide(starving(30.0, 2, 450), replace(CONFIG, confirm=1), in_cooldown.state)
    assert (after.desired, after.reason) == (6, STARVING)


def test_hold_when_fed_and_not_idle():
    decision = run([signals(t=0), signals(t=5), signals(t=10)])[-1]
    assert (decision.desired, decision.reason) == (4, HOLD)
    assert decision.state.up_streak == decision.state.down_streak == 0


def test_waiting_trainers_with_a_full_queue_neither_scale_up_nor_down():
    # the queue is full, so more producers would not help; the trainers wait, so fewer hurt
    s = signals(wait=0.3, queue=BACKLOG, backpressure=0.9)
    decisions = run([replace(s, time_s=t) for t in (0, 5, 10)])
    assert [(d.desired, d.reason) for d in decisions] == [(4, HOLD)] * 3


@pytest.mark.parametrize(
    "field", ["time_s", "data_wait_share", "consumed_per_s", "produced_per_s", "backpressure_share"]
)
@pytest.mark.parametrize("value", [math.nan, None, math.inf])
def test_no_signal_holds_and_restarts_confirmation(field, value):
    state = PolicyState(last_change_s=None, up_streak=5, down_streak=0)
    decision = decide(replace(starving(0, 2, 450), **{field: value}), CONFIG, state)
    assert (decision.desired, decision.reason) == (2, NO_SIGNAL)
    assert decision.state.up_streak == 0
    assert replace(starving(0, 2, 450), **{field: value}).missing() == (field,)


@pytest.mark.parametrize("field", ["queue_length", "max_backlog"])
def test_no_signal_for_unknown_queue(field):
    decision = decide(replace(signals(), **{field: None}), CONFIG, PolicyState())
    assert (decision.desired, decision.reason) == (4, NO_SIGNAL)


def test_bounds_are_enforced_at_once_whatever_the_signals_and_cooldown():
    recent = PolicyState(last_change_s=99.0, up_streak=3)
    low = decide(replace(signals(producers=0), data_wait_share=math.nan), CONFIG, recent)
    assert (low.desired, low.reason) == (1, BELOW_MIN)
    high = decide(starving(100, 12, 5000), CONFIG, recent)
    assert (high.desired, high.reason) == (8, ABOVE_MAX)
    assert high.state == PolicyState(last_change_s=100)


@pytest.mark.parametrize("case", ["starving", "idle"])
def test_a_vanishing_producer_rate_is_no_crash(case):
    tiny = 1e-323  # a subnormal float: one of 10 producers' share of it is 0.0
    if case == "starving":
        s = signals(producers=10, wait=0.5, consumed=900, produced=tiny, queue=0, backpressure=0)
    else:
        s = signals(producers=10, consumed=900, produced=tiny, queue=BACKLOG, backpressure=0.6)
    decision = decide(s, replace(CONFIG, max_producers=16, confirm=1), PolicyState())
    assert CONFIG.min_producers <= decision.desired <= 16


def test_confirmation_needs_consecutive_observations():
    config = replace(CONFIG, confirm=3)
    broken = [starving(0, 2, 450), starving(5, 2, 450), signals(10, 2), starving(15, 2, 450)]
    assert [d.reason for d in run(broken, config)] == [CONFIRMING, CONFIRMING, HOLD, CONFIRMING]
    steady = [starving(t, 2, 450) for t in (0, 5, 10)]
    assert [d.reason for d in run(steady, config)] == [CONFIRMING, CONFIRMING, STARVING]


@pytest.mark.parametrize(
    "bad",
    [
        {"min_producers": -1},
        {"min_producers": 3, "max_producers": 2},
        {"min_producers": 0, "max_producers": 0},
        {"starve_threshold": 0.0},
        {"full_fraction": 1.5},
        {"idle_backpressure": 1.0},
        {"cooldown_s": -1.0},
        {"headroom": 0.9},
        {"headroom": 2.0, "idle_backpressure": 0.5},
        {"confirm": 0},
        {"down_margin": -0.1},
    ],
)
def test_invalid_config_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        PolicyConfig(**bad)


# ------------------------------------------------------------------- hypothesis: open loop

maybe = st.one_of(st.none(), st.just(math.nan))
shares = st.floats(-0.1, 1.1) | maybe
rates = st.floats(0, 1e6) | st.floats(0, 1e-3) | maybe


@st.composite
def configs(draw) -> PolicyConfig:
    low = draw(st.integers(0, 4))
    return PolicyConfig(
        min_producers=low,
        max_producers=draw(st.integers(max(1, low), 32)),
        starve_threshold=draw(st.floats(0.01, 0.3)),
        full_fraction=draw(st.floats(0.5, 0.99)),
        idle_backpressure=(idle := draw(st.floats(0.2, 0.9))),
        cooldown_s=draw(st.floats(0, 120)),
        headroom=draw(st.floats(1.0, min(2.0, 0.99 / (1 - idle)))),
        confirm=draw(st.integers(1, 4)),
        down_margin=draw(st.sampled_from([0.1, 0.2, 0.5])),
    )


@st.composite
def any_signals(draw, t: float | None = None) -> Signals:
    backlog = draw(st.integers(1, 4096) | st.none())
    return Signals(
        time_s=draw(st.floats(0, 1e6)) if t is None else t,
        producers=draw(st.integers(0, 40)),
        data_wait_share=draw(shares),
        consumed_per_s=draw(rates),
        produced_per_s=draw(rates),
        queue_length=draw(st.integers(0, 5000) | st.none()),
        max_backlog=backlog,
        backpressure_share=draw(shares),
    )


states = st.builds(
    PolicyState,
    last_change_s=st.none() | st.floats(0, 1e6),
    up_streak=st.integers(0, 5),
    down_streak=st.integers(0, 5),
)


def _known(x) -> bool:
    return x is not None and math.isfinite(x)


@st.composite
def measured_signals(draw) -> Signals:
    """Signals as a running stack gives them: a few producers around a small bound, values in
    range and sometimes not measured yet (NaN), so that every branch of the policy is likely.
    No subnormal rates: see test_a_vanishing_producer_rate_is_no_crash."""
    backlog = draw(st.integers(1, 64))
    rate = st.floats(0, 1000, allow_subnormal=False)
    return Signals(
        time_s=draw(st.floats(0, 200)),
        producers=draw(st.integers(0, 10)),
        data_wait_share=draw(st.floats(0, 1) | st.just(math.nan)),
        consumed_per_s=draw(rate),
        produced_per_s=draw(rate),
        queue_length=draw(st.integers(0, backlog)),
        max_backlog=backlog,
        backpressure_share=draw(st.floats(0, 1)),
    )


def test_every_reason_is_returned_for_some_input():
    """The reasons are the ``reason`` label of the autoscaler's metrics: a search over
    signals, configurations and states finds an input for each one, so none is a dead label
    (and the property below shows that no other is ever returned)."""
    search = settings(
        max_examples=5000, database=None, derandomize=True, deadline=None, phases=[Phase.generate]
    )
    inputs = st.tuples(measured_signals(), configs(), states)
    for reason in REASONS:
        s, config, state = find(inputs, lambda x, r=reason: decide(*x).reason == r, settings=search)
        assert decide(s, config, state).reason == reason
        assert reason.isidentifier() and reason == reason.lower()  # a plain label value


@PROPERTY
@given(any_signals(), configs(), states)
def test_desired_is_always_within_bounds_with_a_known_reason(s, config, state):
    decision = decide(s, config, state)
    assert config.min_producers <= decision.desired <= config.max_producers
    assert decision.reason in REASONS
    assert (decision.desired != s.producers) == (decision.reason in CHANGES)


@PROPERTY
@given(any_signals(), configs(), states)
def test_never_scales_down_while_trainers_wait(s, config, state):
    if not (_known(s.data_wait_share) and s.data_wait_share > config.starve_threshold):
        return
    if s.producers <= config.max_producers:
        assert decide(s, config, state).desired >= s.producers


@PROPERTY
@given(any_signals(), configs(), states)
def test_never_scales_up_while_the_queue_is_full(s, config, state):
    if not (_known(s.queue_length) and _known(s.max_backlog)):
        return
    if (
        s.queue_length >= config.full_fraction * s.max_backlog
        and s.producers >= config.min_producers
    ):
        assert decide(s, config, state).desired <= s.producers


@PROPERTY
@given(
    configs(),
    st.lists(st.tuples(any_signals(t=0.0), st.floats(0, 40)), min_size=2, max_size=30),
)
def test_changes_respect_the_cooldown(config, steps):
    state, t, last_change = PolicyState(), 0.0, None
    for s, dt in steps:
        t += dt
        decision = decide(replace(s, time_s=t), config, state)
        state = decision.state
        if decision.desired != s.producers:
            if decision.reason in (STARVING, QUEUE_FULL) and last_change is not None:
                assert t - last_change >= config.cooldown_s
            last_change = t


# ---------------------------------------------------------------- hypothesis: closed loop


def observe(
    t: float, n: int, demand: float, rate: float, rng: random.Random, noise: float
) -> Signals:
    """The signals a fleet of ``n`` producers of ``rate`` and trainers of ``demand`` give,
    each rate measured within ± ``noise``; fed trainers still show up to 2% data wait."""
    measured_rate = rate * (1 + noise * rng.uniform(-1, 1))
    measured_demand = demand * (1 + noise * rng.uniform(-1, 1))
    capacity = n * measured_rate
    if capacity >= measured_demand:
        fed_wait = 0.02 * rng.random()
        d = measured_demand
        return Signals(t, n, fed_wait, d, d, BACKLOG, BACKLOG, 1 - d / capacity)
    wait = 1 - capacity / measured_demand
    return Signals(t, n, wait, capacity, capacity, 0, BACKLOG, 0.0)


def closed_loop(config, n, demand, rate, seed, noise, observations, interval=5.0):
    rng, state, changes = random.Random(seed), PolicyState(), []
    for i in range(observations):
        decision = decide(observe(i * interval, n, demand, rate, rng, noise), config, state)
        state = decision.state
        if decision.desired != n:
            changes.append((i * interval, n, decision.desired))
            n = decision.desired
    return n, changes


@PROPERTY
@given(
    configs(),
    st.floats(1, 1000),  # rate per producer
    st.floats(0.0, 1.0),  # demand as a share of max capacity
    st.floats(0.0, 0.024),  # measurement noise on each rate (policy docstring: down_margin)
    st.integers(0, 2**32),  # noise seed
)
def test_sustained_starvation_is_covered_within_three_decisions(config, rate, share, noise, seed):
    # the margins must exceed the measurement noise: 10% headroom, a 5% wait threshold
    config = replace(
        config,
        headroom=max(config.headroom, 1.1),
        starve_threshold=max(config.starve_threshold, 0.05),
    )
    top = config.max_producers * rate
    demand = max(share * top, 1e-3 * rate)
    start = config.min_producers
    if start * rate >= demand:
        return  # already fed
    n, changes = closed_loop(config, start, demand, rate, seed, noise, observations=200)
    # fed as the policy sees it: data wait at most the threshold (give or take the noise)
    assert 1 - n * rate / demand <= config.starve_threshold + 3 * noise or n == config.max_producers
    assert len(changes) <= 3, changes
    assert all(after > before for _, before, after in changes)


@PROPERTY
@given(
    configs(),
    st.floats(1, 1000),
    st.floats(0.01, 1.0),
    st.integers(1, 32),  # start count; fed: its capacity covers demand
    st.floats(0.0, 0.024),  # measurement noise on each rate
    st.integers(0, 2**32),  # noise seed
)
def test_stationary_noisy_fed_state_never_flaps(config, rate, share, n, noise, seed):
    config = replace(config, starve_threshold=max(config.starve_threshold, 0.05))
    n = min(max(n, config.min_producers), config.max_producers)
    demand = share * n * rate  # n producers cover it
    _, changes = closed_loop(config, n, demand, rate, seed, noise, observations=120)
    directions = {after > before for _, before, after in changes}
    assert len(directions) <= 1, f"flapped: {changes}"  # never up then down, or down then up


# --------------------------------------------------------------------------- simulation


def test_flap_detector():
    assert flapped([Change(0, 2, 4, STARVING), Change(100, 4, 2, QUEUE_FULL)], 120)
    assert not flapped([Change(0, 2, 4, STARVING), Change(200, 4, 2, QUEUE_FULL)], 120)
    assert not flapped([Change(0, 2, 4, STARVING), Change(35, 4, 6, STARVING)], 120)


@pytest.mark.parametrize("seed", [1337, 1, 2, 3, 4])
def test_simulation_converges_without_flapping(seed):
    step_up, step_down, noisy, ramp = run_all(CONFIG, SimParams(seed=seed))
    for r in (step_up, step_down, noisy):
        assert len(r.changes) == 1, (r.scenario, r.changes)  # one right-sized step
        assert r.fed_after_s <= 30, r.scenario
        assert r.needed <= r.final <= math.ceil(r.needed * CONFIG.headroom), r.scenario
    assert [c.after for c in step_up.changes] == [6]  # ceil(450 x 1.2 / 100)
    assert [c.after for c in step_down.changes] == [2]  # ceil(100 x 1.2 / 100)
    assert step_down.wait_share == 0.0  # scaling down never starved the trainers
    assert len(ramp.changes) <= 4 and ramp.fed_after_s <= 30
    assert all(r.ups == len(r.changes) for r in (step_up, noisy, ramp))
    assert not any(r.flapped for r in (step_up, step_down, noisy, ramp))
    assert step_up.wait_share < 0.05 and noisy.wait_share < 0.05


def test_simulation_detects_flapping_without_hysteresis_and_cooldown():
    # the control: the same patterns with confirm=1, no cooldown and no headroom flap
    eager = replace(CONFIG, confirm=1, cooldown_s=0.0, headroom=1.0)
    assert any(r.flapped for r in run_all(eager, SimParams()))
