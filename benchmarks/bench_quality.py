"""Model quality you can compare: the masked-diffusion model and the
autoregressive baseline, trained one after the other by the same producers on
the same preset and token budget, each through ``python -m services.local``.

Prints each model's likelihood bound on the same validation windows (the
diffusion ELBO and the AR NLL, nats and bits per character), their ratio,
tokens and wall time, a sample of each, and the generative perplexity of
diffusion samples at 64 and 128 unmasking steps under the AR model, beside the
AR model's own samples. Run from the repository root::

    python -m benchmarks.bench_quality                      # the tiny preset, CPU
    python -m benchmarks.bench_quality --ar_learning_rate=1e-3 --max_iters=2000

Any ``--key=value`` is a setting for both runs; ``--ar_<key>=value`` for the
baseline only; ``--reuse`` takes the checkpoints an earlier run left (only the
sampling runs again).

``--curve=62,125,250,500,1000`` trains both models once per step count instead
(each with its whole learning-rate schedule) and prints both bounds at each
budget, and for each diffusion ELBO the AR budget that reaches the same NLL: how
many times the tokens the diffusion model needs for the AR model's quality.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import with_defaults
from shared.lifecycle import child_env

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("BENCH_QUALITY_DIR", "/tmp/maskstream-bench-quality"))
SAMPLE_SEEDS = (1, 2, 3, 4)
TARGET, GOAL = 1.15, 1.10  # ELBO / AR NLL: the acceptance bar and the published gap


def run_local(name: str, args: list[str], reuse: bool) -> tuple[float, float, float, float, str]:
    """Train with ``services.local`` (or, with ``reuse``, take the checkpoint an
    earlier run left); returns (nats, stderr, bits, seconds, log) of the final
    evaluation, from the checkpoint's history."""
    checkpoint = OUT / name / "ckpt.pt"
    if reuse and checkpoint.is_file():
        return (*final_bound(checkpoint), math.nan, "")
    started = time.monotonic()
    out = subprocess.run(
        # Its own folder, started over each time (--reuse reads it instead).
        [
            sys.executable,
            "-m",
            "services.local",
            "--init_from=scratch",  # the user's own --init_from, later, wins
            *args,
            f"--out_dir={OUT / name}",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    if out.returncode != 0:
        sys.exit(f"bench-quality: the {name} run failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return (*final_bound(checkpoint), seconds, out.stdout)


def final_bound(checkpoint: Path) -> tuple[float, float, float]:
    """(nats, stderr, bits) of a run's last evaluation."""
    from services.trainer.checkpoint import Checkpoint  # torch: only here

    last = Checkpoint.load(checkpoint).history[-1]
    return last["nats_per_char"], last["stderr_nats"], last["bits_per_char"]


def sample(checkpoint: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "services.trainer.sample", f"--checkpoint={checkpoint}", *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"bench-quality: sampling failed:\n{out.stderr[-2000:]}")
    return out.stdout


def sample_text(output: str) -> str:
    return output.split(" --\n", 1)[1].split("\n--\n", 1)[0]


def judged(output: str) -> float:
    return float(re.search(r"judge NLL of the generated text: ([\d.]+)", output).group(1))


def entropy(output: str) -> float:
    return float(re.search(r"entropy of the generated text: ([\d.]+)", output).group(1))


def budget_args(steps: int) -> list[str]:
    """One budget of ``--curve``: its own whole schedule, warmup at most a fifth of it."""
    every = min(250, steps)
    return [f"--max_iters={steps}", f"--lr_decay_iters={steps}",
            f"--warmup_iters={min(50, steps // 5)}", f"--eval_interval={every}",
            f"--checkpoint_interval={every}"]  # fmt: skip


def equal_quality_tokens(curve: list[tuple[int, float]], nats: float) -> float | None:
    """The tokens at which the AR curve ((tokens, NLL), NLL falling) reaches
    ``nats``, interpolated linearly in log tokens; None outside the measured range."""
    for (t0, n0), (t1, n1) in itertools.pairwise(curve):
        if n1 <= nats <= n0:
            share = (n0 - nats) / (n0 - n1) if n0 != n1 else 0.0
            return math.exp(math.log(t0) + share * (math.log(t1) - math.log(t0)))
    return None


def token_curve(shared: list[str], ar_only: list[str], steps: list[int], reuse: bool) -> int:
    from services.trainer.checkpoint import Checkpoint

    print(f"\n{'steps':>6}{'tokens':>12}{'AR NLL':>9}{'± se':>8}{'ELBO':>9}{'± se':>8}"
          f"{'ratio':>7}{'wall s':>8}", flush=True)  # fmt: skip
    ar_curve, elbos = [], []
    for n in steps:
        ar = run_local(f"ar-{n}", [*shared, *budget_args(n), "--objective=ar", *ar_only], reuse)
        diffusion = run_local(f"diffusion-{n}", [*shared, *budget_args(n)], reuse)
        tokens = Checkpoint.load(OUT / f"diffusion-{n}" / "ckpt.pt").tokens
        ar_curve.append((tokens, ar[0]))
        elbos.append((tokens, diffusion[0]))
        print(f"{n:>6}{tokens:>12,}{ar[0]:>9.4f}{ar[1]:>8.4f}{diffusion[0]:>9.4f}"
              f"{diffusion[1]:>8.4f}{diffusion[0] / ar[0]:>7.3f}{ar[3] + diffusion[3]:>8.0f}",
              flush=True)  # fmt: skip
    print("\nthe AR budget with the diffusion model's quality (its NLL = the ELBO):")
    for tokens, nats in elbos:
        same = equal_quality_tokens(ar_curve, nats)
        if same is None:
            print(f"  ELBO {nats:.4f} at {tokens:,} tokens: outside the AR curve measured")
        else:
            print(f"  ELBO {nats:.4f} at {tokens:,} tokens = AR NLL at {same:,.0f} tokens: "
                  f"{tokens / same:.1f}x the tokens")  # fmt: skip
    return 0


def main(argv: list[str]) -> int:
    reuse = "--reuse" in argv
    argv = [a for a in argv if a != "--reuse"]
    steps = [int(n) for a in argv if a.startswith("--curve=") for n in a[8:].split(",")]
    argv = [a for a in argv if not a.startswith("--curve=")]
    shared = [a for a in argv if not a.startswith("--ar_")]
    ar_only = ["--" + a[len("--ar_") :] for a in argv if a.startswith("--ar_")]
    shared = with_defaults(shared)
    print(f"bench-quality: {' '.join(shared)}; baseline also {' '.join(ar_only) or '(nothing)'}")
    if steps:
        return token_curve(shared, ar_only, sorted(steps), reuse)

    ar = run_local("ar", [*shared, "--objective=ar", *ar_only], reuse)
    diffusion = run_local("diffusion", shared, reuse)
    from services.trainer.checkpoint import Checkpoint

    budget = Checkpoint.load(OUT / "diffusion" / "ckpt.pt").tokens

    ar_ckpt, diff_ckpt = OUT / "ar" / "ckpt.pt", OUT / "diffusion" / "ckpt.pt"
    judge = f"--judge={ar_ckpt}"
    gen: dict[str, list[tuple[float, float]]] = {"ar": [], "diffusion 64": [], "diffusion 128": []}
    shown: dict[str, str] = {}
    for seed in SAMPLE_SEEDS:
        out = sample(ar_ckpt, f"--seed={seed}", judge)
        gen["ar"].append((judged(out), entropy(out)))
        shown.setdefault("ar", sample_text(out))
        for steps in (64, 128):
            out = sample(diff_ckpt, f"--seed={seed}", f"--steps={steps}", "--order=random", judge)
            gen[f"diffusion {steps}"].append((judged(out), entropy(out)))
            shown.setdefault(f"diffusion {steps}", sample_text(out))

    ratio = diffusion[0] / ar[0]
    print(f"\nsame preset and budget: {budget:,} training tokens each\n")
    print(f"{'model':<34}{'nats/char':>11}{'± se':>8}{'bits/char':>11}{'wall s':>9}")
    print(f"{'autoregressive baseline (AR NLL)':<34}{ar[0]:>11.4f}{ar[1]:>8.4f}{ar[2]:>11.4f}"
          f"{ar[3]:>9.0f}")  # fmt: skip
    print(f"{'masked diffusion (ELBO)':<34}{diffusion[0]:>11.4f}{diffusion[1]:>8.4f}"
          f"{diffusion[2]:>11.4f}{diffusion[3]:>9.0f}")  # fmt: skip
    print(f"ELBO / AR NLL = {ratio:.3f} (acceptance <= {TARGET}, published gap ~{GOAL})")
    print(f"\n{'samples (4 seeds)':<34}{'judge NLL':>11}{'gen. ppl':>10}{'entropy':>9}")
    for name, values in gen.items():
        nll = sum(v for v, _ in values) / len(values)
        ent = sum(e for _, e in values) / len(values)
        label = "AR, its own samples" if name == "ar" else f"{name} steps, random order"
        print(f"{label:<34}{nll:>11.4f}{math.exp(nll):>10.3f}{ent:>9.3f}")
    for name in ("ar", "diffusion 128"):
        print(f"\n-- a sample of the {name} model --\n{shown[name]}\n--")
    print(f"\n{'PASS' if ratio <= TARGET else 'FAIL'}  ELBO / AR NLL {ratio:.3f} (<= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
