"""Autoscaler simulation: the policy of services/autoscaler/policy.py driving a simulated
producer fleet and bounded queue through demand patterns, in 1 s ticks, deterministic per seed.

Run from the repository root::

    python -m benchmarks.bench_autoscaler               # the table and the checks
    python -m benchmarks.bench_autoscaler --seed=7 --rate-noise=0.1 --strict

The simulation itself (the model, the demand patterns, what is measured) lives in
services/autoscaler/simulation.py; this script runs it and prints a table and pass/fail checks.
"""

from __future__ import annotations

import argparse
import math
import sys

from services.autoscaler.policy import PolicyConfig
from services.autoscaler.simulation import SimParams, SimResult, run_all

TARGET_DECISIONS = 3  # changes per demand change
TARGET_FED_S = 30.0  # fed for good within this long after the last demand change


def report(results: list[SimResult]) -> None:
    header = (
        f"{'pattern':<26}{'decisions':>10}{'up/down':>9}{'fed after':>11}{'final/min':>11}"
        f"{'over p*s':>10}{'wait':>8}  flapped"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.scenario:<26}{len(r.changes):>10}{f'{r.ups}/{r.downs}':>9}"
            f"{f'{r.fed_after_s:.0f} s':>11}{f'{r.final}/{r.needed}':>11}"
            f"{r.over_producer_s:>10.0f}{r.wait_share:>8.1%}  {'YES' if r.flapped else 'no'}"
        )
    print()
    print(
        "decisions: count changes; fed after: seconds from the last demand change until the\n"
        "trainers' data-wait share over the window stays <= the threshold (includes up to one\n"
        "window of measurement lag); final/min: the count at the end / ceil(demand / rate);\n"
        "over p*s: producer-seconds run beyond that minimum; wait: unmet / demand, whole run\n"
    )
    for r in results:
        steps = ", ".join(f"t={c.time_s:.0f}s {c.before}->{c.after} {c.reason}" for c in r.changes)
        print(f"{r.scenario}: {steps or 'no change'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults, policy = SimParams(), PolicyConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="batches/s per producer")
    parser.add_argument("--rate-noise", type=float, default=defaults.rate_noise)
    parser.add_argument("--max-backlog", type=int, default=defaults.max_backlog)
    parser.add_argument("--window", type=int, default=defaults.window_s, help="seconds")
    parser.add_argument("--interval", type=int, default=defaults.interval_s, help="seconds")
    parser.add_argument("--startup", type=int, default=defaults.startup_s, help="seconds")
    parser.add_argument("--cooldown", type=float, default=policy.cooldown_s, help="seconds")
    parser.add_argument("--confirm", type=int, default=policy.confirm)
    parser.add_argument("--headroom", type=float, default=policy.headroom)
    parser.add_argument("--max-producers", type=int, default=policy.max_producers)
    parser.add_argument("--strict", action="store_true", help="exit 1 if a check fails")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = SimParams(
        rate=args.rate,
        rate_noise=args.rate_noise,
        max_backlog=args.max_backlog,
        window_s=args.window,
        interval_s=args.interval,
        startup_s=args.startup,
        seed=args.seed,
    )
    config = PolicyConfig(
        cooldown_s=args.cooldown,
        confirm=args.confirm,
        headroom=args.headroom,
        max_producers=args.max_producers,
    )
    print(
        f"maskstream autoscaler simulation: {params.rate:g} batches/s per producer "
        f"(±{params.rate_noise:.0%}), max_backlog {params.max_backlog}, "
        f"{params.window_s} s window, decisions every {params.interval_s} s, "
        f"start-up {params.startup_s} s, seed {params.seed}\n"
        f"policy: {config}\n"
    )
    results = run_all(config, params)
    report(results)
    checks = [
        (
            all(not r.flapped for r in results),
            f"no flapping (no reversal within {params.flap_window_s:g} s) in any pattern",
        ),
        (
            all(len(r.changes) <= TARGET_DECISIONS for r in results[:3]),
            f"steps and noisy: at most {TARGET_DECISIONS} decisions each "
            f"({', '.join(str(len(r.changes)) for r in results[:3])})",
        ),
        (
            all(r.fed_after_s <= TARGET_FED_S for r in results),
            f"fed within {TARGET_FED_S:g} s of the last demand change "
            f"({', '.join(f'{r.fed_after_s:.0f}' for r in results)} s)",
        ),
        (
            all(r.needed <= r.final <= math.ceil(r.needed * config.headroom) for r in results),
            "final count between the minimum needed and minimum x headroom (rounded up)",
        ),
    ]
    print("\n== Summary ==")
    for passed, text in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return 1 if args.strict and not all(passed for passed, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
