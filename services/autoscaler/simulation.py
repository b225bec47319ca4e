"""The autoscaler policy (:mod:`services.autoscaler.policy`) driving a simulated producer fleet
and bounded queue through demand patterns, in 1 s ticks, deterministic per seed.

``benchmarks/bench_autoscaler.py`` prints these results as a table;
``tests/test_autoscaler_policy.py`` asserts on them.

Model, per second: every started producer makes ``rate`` batches/s (± ``rate_noise``) into a
queue bounded by ``max_backlog``; what does not fit is backpressure (producer time blocked).
The trainers want ``demand(t)`` batches/s (± the pattern's noise) and take what is queued;
the unmet share is their data wait. The autoscaler sees these averaged over the last
``window`` seconds (like Prometheus ``rate(...[10s])``) plus the queue length now, calls
:func:`~services.autoscaler.policy.decide` every ``interval`` seconds, and a replica it adds
starts producing ``startup`` seconds later (a new container); one it removes stops at once,
the newest first.

Per pattern, :func:`simulate` reports (:class:`SimResult`): the count changes, seconds from the
last demand change until the trainers are fed for good (their data-wait share over the window
stays at most the policy's ``starve_threshold`` from then on), the final count against the
fewest that cover demand, ceil(demand / rate), producer-seconds run beyond that minimum
(over-provisioning), the trainers' overall data-wait share, and whether it flapped (a change
reversed within ``flap_window`` seconds).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.autoscaler.policy import Decision, PolicyConfig, PolicyState, Signals, decide


@dataclass(frozen=True)
class Scenario:
    """A demand pattern and the producer count it starts from."""

    name: str
    demand: Callable[[float], float]  # nominal batches/s the trainers want at time t
    initial_producers: int
    settle_from_s: float  # end of the last demand change: "fed after" counts from here
    demand_noise: float = 0.0  # uniform ± share of demand, drawn every second
    duration_s: int = 300


@dataclass(frozen=True)
class SimParams:
    """The simulated fleet, queue and measurement."""

    rate: float = 100.0  # batches/s one producer makes when not blocked
    rate_noise: float = 0.05  # uniform ± share, per producer per second
    max_backlog: int = 256
    window_s: int = 10  # signals are averages over this many seconds
    interval_s: int = 5  # the autoscaler decides every this many seconds
    startup_s: int = 3  # a new replica produces this long after it was asked for
    flap_window_s: float = 120.0  # a reversal within this long counts as flapping
    seed: int = 1337


@dataclass(frozen=True)
class Change:
    """One change of the producer count the policy asked for."""

    time_s: float
    before: int
    after: int
    reason: str


@dataclass
class SimResult:
    """What one scenario's run did."""

    scenario: str
    changes: list[Change]
    fed_after_s: float  # seconds after settle_from_s until fed for good
    final: int
    needed: int  # ceil(final demand / rate), at least min_producers
    over_producer_s: float  # producer-seconds beyond the minimum needed
    wait_share: float  # unmet demand / demand over the whole run
    flapped: bool
    reasons: dict[str, int] = field(default_factory=dict)  # decisions by reason

    @property
    def ups(self) -> int:
        return sum(c.after > c.before for c in self.changes)

    @property
    def downs(self) -> int:
        return sum(c.after < c.before for c in self.changes)


def step(before: float, after: float, at_s: float) -> Callable[[float], float]:
    """Demand ``before`` until ``at_s``, ``after`` from then on."""
    return lambda t: before if t < at_s else after


def ramp(before: float, after: float, start_s: float, end_s: float) -> Callable[[float], float]:
    """Demand moving linearly from ``before`` to ``after`` between ``start_s`` and ``end_s``."""

    def demand(t: float) -> float:
        share = min(1.0, max(0.0, (t - start_s) / (end_s - start_s)))
        return before + share * (after - before)

    return demand


def scenarios() -> list[Scenario]:
    """The demand patterns, each starting from a count that fits its initial demand."""
    return [
        Scenario("step up 100->450 @60s", step(100, 450, 60), 2, 60),
        Scenario("step down 450->100 @60s", step(450, 100, 60), 6, 60),
        Scenario("noisy 300 +-20%, cold", step(300, 300, 0), 1, 0, demand_noise=0.2),
        Scenario("ramp 100->500, 60-180s", ramp(100, 500, 60, 180), 2, 180),
    ]


def simulate(scenario: Scenario, config: PolicyConfig, params: SimParams) -> SimResult:
    """Run ``scenario`` under the policy ``config``, one tick per simulated second."""
    rng = random.Random(f"{params.seed}:{scenario.name}")
    ready_at = [-math.inf] * scenario.initial_producers  # per replica, newest last
    queue = 0.0
    window: deque[tuple[float, ...]] = deque(maxlen=params.window_s)
    state = PolicyState()
    changes: list[Change] = []
    reasons: dict[str, int] = {}
    last_starved_s = -math.inf
    over = unmet_total = demand_total = 0.0

    for t in range(scenario.duration_s):
        nominal = scenario.demand(t)
        demand = nominal * (1 + scenario.demand_noise * rng.uniform(-1, 1))
        active = sum(ready <= t for ready in ready_at)
        capacity = sum(
            params.rate * (1 + params.rate_noise * rng.uniform(-1, 1)) for _ in range(active)
        )
        consumed = min(demand, queue + capacity)
        left = queue + capacity - consumed
        blocked = max(0.0, left - params.max_backlog)
        queue = left - blocked
        unmet = demand - consumed
        window.append((demand, consumed, unmet, capacity, capacity - blocked, blocked))

        needed = max(config.min_producers, math.ceil(nominal / params.rate))
        over += max(0, len(ready_at) - needed)
        unmet_total += unmet
        demand_total += demand
        signals = measure(t, len(ready_at), queue, window, params)
        if signals.data_wait_share > config.starve_threshold:
            last_starved_s = t

        if t > 0 and t % params.interval_s == 0:
            decision = decide(signals, config, state)
            state = decision.state
            reasons[decision.reason] = reasons.get(decision.reason, 0) + 1
            if decision.desired != len(ready_at):
                changes.append(Change(t, len(ready_at), decision.desired, decision.reason))
                ready_at = apply(ready_at, decision, t + params.startup_s)

    end = scenario.duration_s - 1
    return SimResult(
        scenario=scenario.name,
        changes=changes,
        fed_after_s=max(0.0, last_starved_s + 1 - scenario.settle_from_s),
        final=len(ready_at),
        needed=max(config.min_producers, math.ceil(scenario.demand(end) / params.rate)),
        over_producer_s=over,
        wait_share=unmet_total / demand_total if demand_total else 0.0,
        flapped=flapped(changes, params.flap_window_s),
        reasons=reasons,
    )


def measure(
    t: float, producers: int, queue: float, window: deque[tuple[float, ...]], params: SimParams
) -> Signals:
    """What Prometheus would say: window averages of the rates, shares as ratios of sums."""
    demand, consumed, unmet, capacity, produced, blocked = (
        sum(col) for col in zip(*window, strict=True)
    )
    seconds = len(window)
    return Signals(
        time_s=float(t),
        producers=producers,
        data_wait_share=unmet / demand if demand > 0 else 0.0,
        consumed_per_s=consumed / seconds,
        produced_per_s=produced / seconds,
        queue_length=int(queue),
        max_backlog=params.max_backlog,
        backpressure_share=blocked / capacity if capacity > 0 else math.nan,
    )


def apply(ready_at: list[float], decision: Decision, ready_s: float) -> list[float]:
    """Start replicas (producing from ``ready_s``) or stop the newest ones."""
    if decision.desired > len(ready_at):
        return ready_at + [ready_s] * (decision.desired - len(ready_at))
    return ready_at[: decision.desired]


def flapped(changes: list[Change], window_s: float) -> bool:
    """Any change followed by one in the other direction within ``window_s``."""
    return any(
        (a.after - a.before) * (b.after - b.before) < 0 and b.time_s - a.time_s <= window_s
        for a, b in itertools.pairwise(changes)
    )


def run_all(config: PolicyConfig, params: SimParams) -> list[SimResult]:
    """Every scenario of :func:`scenarios`, in order."""
    return [simulate(scenario, config, params) for scenario in scenarios()]
