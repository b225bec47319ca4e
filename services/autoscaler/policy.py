"""How many producer replicas to run: signals in, a desired count and a reason out.

The policy is a pure function, :func:`decide`, with no clock, no I/O and no Docker: the caller
measures the signals (Prometheus rates over a window), passes the state returned by the previous
decision, and applies ``Decision.desired`` itself. That keeps it testable and lets
``services/autoscaler/simulation.py`` simulate it (tests and ``make bench-autoscaler``).

Rules, in order:

1. Bounds first: a running count outside ``[min_producers, max_producers]`` is clamped at once
   (``below_min`` / ``above_max``), whatever the signals and the cooldown say.
2. A signal that cannot be measured yet (NaN or None) holds the count (``no_signal``).
3. **Up** when the trainers wait for data (``data_wait_share > starve_threshold``) and the queue
   is not full. The step is sized from measured rates, not one replica at a time::

       demand       = consumed_per_s / max(1 - data_wait_share, SHARE_FLOOR)
       per_producer = produced_per_s / producers
       desired      = max(producers + 1, ceil(demand * headroom / per_producer))

   (what the trainers would eat if never starved, with headroom, over what one replica makes).
4. **Down** when the queue sits at its bound (``queue_length >= full_fraction * max_backlog``)
   and the producers mostly wait on backpressure (``backpressure_share >= idle_backpressure``)
   and the trainers are fed::

       per_producer = produced_per_s / producers / max(1 - backpressure_share, SHARE_FLOOR)
       desired      = max(min_producers,
                          ceil(consumed_per_s * headroom * (1 + down_margin) / per_producer))

   and only if that is below the current count (else ``hold``): a replica is never removed
   when the measured rates say the remaining ones would not cover demand with headroom.
   Nothing consumed at all: down to ``min_producers``; no producer rate measured: one fewer.
5. Hysteresis: the two conditions are far apart (starving vs full and idle: between them lies
   every capacity from demand up to demand / (1 - idle_backpressure)), each must hold for
   ``confirm`` consecutive observations (a change restarts the count), and no change is made
   within ``cooldown_s`` of the previous one. After a scale-up to ``demand * headroom`` the
   producers wait on backpressure ``1 - 1/headroom`` of the time (17% at 1.2), well under
   ``idle_backpressure``. Near a rounding boundary (the step up made ceil(5.02) = 6) that
   alone would let a 1% lower reading undo the step (ceil(4.98) = 5); ``down_margin`` sizes
   the step down for ``headroom * (1 + down_margin)``, so demand per producer rate must read
   ``down_margin`` lower than it did before a replica goes (at the default 10%: each of the
   two rates measured within ±2.4% never reverses a step). ``headroom`` must stay below
   ``1 / (1 - idle_backpressure)``, or a right-sized fleet would itself look idle.

``cooldown_s`` should exceed the signals' measurement window plus a new replica's start-up
time, so that the rates a decision is sized from were measured after the previous change took
effect. ``confirm`` counts calls to :func:`decide`, so it is a duration only at a fixed cadence.

Reasons (the ``reason`` label of the autoscaler's metrics; :data:`REASONS` lists them):

==============  ==========================================================================
``starving``    scaled up: trainers wait for data and the queue is not full
``queue_full``  scaled down: queue at its bound, producers idle on backpressure, trainers fed
``at_max``      would scale up but already at ``max_producers`` (trainers stay starved)
``at_min``      would scale down but already at ``min_producers``
``confirming``  a scaling condition holds, not yet for ``confirm`` observations
``cooldown``    a confirmed change waits: the previous change was under ``cooldown_s`` ago
``hold``        neither condition holds, or the measured rates say the count is right
``no_signal``   a signal is not measurable yet (NaN/None): keep the count
``below_min``   running count below ``min_producers``: raised to it
``above_max``   running count above ``max_producers``: lowered to it
==============  ==========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

STARVING = "starving"
QUEUE_FULL = "queue_full"
AT_MAX = "at_max"
AT_MIN = "at_min"
CONFIRMING = "confirming"
COOLDOWN = "cooldown"
HOLD = "hold"
NO_SIGNAL = "no_signal"
BELOW_MIN = "below_min"
ABOVE_MAX = "above_max"
REASONS = (
    STARVING,
    QUEUE_FULL,
    AT_MAX,
    AT_MIN,
    CONFIRMING,
    COOLDOWN,
    HOLD,
    NO_SIGNAL,
    BELOW_MIN,
    ABOVE_MAX,
)
CHANGES = (STARVING, QUEUE_FULL, BELOW_MIN, ABOVE_MAX)  # the reasons that change the count

# The smallest "active" share a rate is divided by: caps the extrapolation from an observed
# rate to an unconstrained one at 20x, where the share is too close to 0 to be trusted.
SHARE_FLOOR = 0.05
_CEIL_SLACK = 1e-9  # 1.2 * 250 / 100 is 3.0000000000000004 in floats: still 3 producers


@dataclass(frozen=True)
class Signals:
    """One observation. Rates and shares are averages over the caller's window.

    A value that cannot be measured yet is ``float("nan")`` (or ``None``); then the policy
    holds. With no producers running, a missing ``produced_per_s`` or ``backpressure_share``
    counts as 0 (no series in Prometheus means no producer, not no data).
    """

    time_s: float  # monotonic seconds; only differences matter (cooldown)
    producers: int  # replicas running now, starting ones included
    data_wait_share: float  # trainers' time waiting for data / step time, 0..1
    consumed_per_s: float  # batches/s taken by all trainers
    produced_per_s: float  # batches/s added by all producers
    queue_length: int | None  # entries in the training stream now
    max_backlog: int | None  # the stream's bound
    backpressure_share: float  # mean share of producer time waiting on a full stream, 0..1

    def missing(self) -> tuple[str, ...]:
        """Names of the signals that are not measurable (NaN, None, infinite)."""
        optional = {"produced_per_s", "backpressure_share"} if self.producers == 0 else set()
        names = (f.name for f in fields(self) if f.name not in optional | {"producers"})
        return tuple(name for name in names if not _known(getattr(self, name)))


@dataclass(frozen=True)
class PolicyConfig:
    min_producers: int = 1
    max_producers: int = 8
    starve_threshold: float = 0.05  # scale up when data_wait_share is above this
    full_fraction: float = 0.9  # the queue is full at/above this share of max_backlog
    idle_backpressure: float = 0.5  # scale down needs producers waiting at least this share
    cooldown_s: float = 30.0  # no change within this long after the previous one
    headroom: float = 1.2  # provision demand x headroom
    confirm: int = 2  # consecutive observations a condition must hold before acting
    down_margin: float = 0.1  # scale down only to what covers demand x headroom x (1 + this)

    def __post_init__(self) -> None:
        problems = []
        if self.min_producers < 0:
            problems.append(f"min_producers = {self.min_producers}: must be >= 0")
        if self.max_producers < max(1, self.min_producers):
            problems.append(
                f"max_producers = {self.max_producers}: must be >= 1 and >= min_producers "
                f"({self.min_producers})"
            )
        for name in ("starve_threshold", "full_fraction", "idle_backpressure"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                problems.append(f"{name} = {value}: must be strictly between 0 and 1")
        if not self.cooldown_s >= 0.0:
            problems.append(f"cooldown_s = {self.cooldown_s}: must be >= 0")
        if not self.headroom >= 1.0:
            problems.append(f"headroom = {self.headroom}: must be >= 1 (1.2 = 20% spare)")
        elif (
            0.0 < self.idle_backpressure < 1.0
            and not self.headroom * (1.0 - self.idle_backpressure) < 1.0
        ):
            problems.append(
                f"headroom = {self.headroom}: must be below 1 / (1 - idle_backpressure) = "
                f"{1.0 / (1.0 - self.idle_backpressure):.3g}, or producers right-sized for "
                f"demand x headroom would wait on backpressure enough to be scaled down"
            )
        if not self.down_margin >= 0.0:
            problems.append(f"down_margin = {self.down_margin}: must be >= 0")
        if self.confirm < 1:
            problems.append(f"confirm = {self.confirm}: must be >= 1")
        if problems:
            raise ValueError("invalid autoscaler policy: " + "; ".join(problems))


@dataclass(frozen=True)
class PolicyState:
    """What :func:`decide` remembers between calls; start with ``PolicyState()``."""

    last_change_s: float | None = None  # time_s of the last change it asked for
    up_streak: int = 0  # consecutive observations of the scale-up condition
    down_streak: int = 0  # consecutive observations of the scale-down condition


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str  # one of REASONS
    state: PolicyState  # pass to the next call
    demand_per_s: float = math.nan  # estimated demand the step was sized for, when sized
    producer_rate_per_s: float = math.nan  # estimated batches/s of one unconstrained replica


def decide(signals: Signals, config: PolicyConfig, state: PolicyState) -> Decision:
    """The producer count to run now, why, and the state for the next call. Pure."""
    n = signals.producers
    now = signals.time_s
    # a change restarts the cooldown and the confirmation counts
    changed = PolicyState(last_change_s=now if _known(now) else state.last_change_s)
    if n < config.min_producers:
        return Decision(config.min_producers, BELOW_MIN, changed)
    if n > config.max_producers:
        return Decision(config.max_producers, ABOVE_MAX, changed)
    if signals.missing():
        return Decision(n, NO_SIGNAL, replace(state, up_streak=0, down_streak=0))

    wait = _share(signals.data_wait_share)
    backpressure = _share(signals.backpressure_share) if n else 0.0
    consumed = max(0.0, float(signals.consumed_per_s))
    produced = max(0.0, float(signals.produced_per_s)) if n else 0.0
    full = signals.queue_length >= config.full_fraction * signals.max_backlog
    starving = wait > config.starve_threshold and not full
    # never scale down while trainers wait, even with a full queue (slow readers, not producers)
    idle = full and backpressure >= config.idle_backpressure and wait <= config.starve_threshold
    state = replace(
        state,
        up_streak=state.up_streak + 1 if starving else 0,
        down_streak=state.down_streak + 1 if idle else 0,
    )
    cooling = state.last_change_s is not None and now - state.last_change_s < config.cooldown_s

    if starving:
        if state.up_streak < config.confirm:
            return Decision(n, CONFIRMING, state)
        demand = consumed / max(1.0 - wait, SHARE_FLOOR)
        rate = produced / n if n > 0 else 0.0
        rate = rate if rate > 0 else math.nan  # none, or so small it underflowed to 0.0
        top = config.max_producers
        target = n + 1 if math.isnan(rate) else _ceil(demand * config.headroom / rate, top)
        target = min(max(target, n + 1), top)
        if target <= n:
            return Decision(n, AT_MAX, state, demand, rate)
        if cooling:
            return Decision(n, COOLDOWN, state, demand, rate)
        return Decision(target, STARVING, PolicyState(last_change_s=now), demand, rate)

    if idle:
        if state.down_streak < config.confirm:
            return Decision(n, CONFIRMING, state)
        if n <= config.min_producers:
            return Decision(n, AT_MIN, state)
        rate = produced / n / max(1.0 - backpressure, SHARE_FLOOR)
        rate = rate if rate > 0 else math.nan  # none, or so small it underflowed to 0.0
        if consumed == 0.0:
            target = config.min_producers  # nobody reads: keep the floor only
        elif math.isnan(rate):
            target = n - 1  # no rate to size from: one replica at a time
        else:
            target = _ceil(consumed * config.headroom * (1 + config.down_margin) / rate, n)
        if target >= n:
            return Decision(n, HOLD, state, consumed, rate)
        target = max(target, config.min_producers)
        if cooling:
            return Decision(n, COOLDOWN, state, consumed, rate)
        return Decision(target, QUEUE_FULL, PolicyState(last_change_s=now), consumed, rate)

    return Decision(n, HOLD, state)


def _known(value: object) -> bool:
    if value is None:
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _share(value: float) -> float:
    """A measured share, clipped to [0, 1] (window edges can push it slightly outside)."""
    return min(1.0, max(0.0, float(value)))


def _ceil(x: float, limit: int) -> int:
    """min(ceil(x), limit) without float noise; x may be huge (a tiny rate) but not NaN."""
    return min(math.ceil(x - _CEIL_SLACK), limit) if x < limit else limit
