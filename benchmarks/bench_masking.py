"""Which masking trains the best ELBO at a fixed budget? Trains the same model
once per masking schedule, in this process and with no Redis (the production
model, masking functions, optimizer, learning-rate schedule and ELBO estimator,
windows drawn as producers draw them), and prints each schedule's validation
ELBO and its ratio to the first schedule's, measured in the same run.

Run from the repository root (about two minutes per schedule for the ``tiny``
preset on two CPU cores)::

    python -m benchmarks.bench_masking
    python -m benchmarks.bench_masking --learning_rate=3e-3 \\
        --schedules='[[{"type":"random","max_masked_ratio":0.6}]]'

Any ``--key=value`` is a setting (the preset and corpus default as in
:func:`benchmarks.with_defaults`: ``tiny``, and ``CORPUS_PATH`` when set);
``--schedules`` is a JSON list of stage lists, each trained with the
``loss_weighting`` setting (default: :data:`SCHEDULES`, each with its own).
The first schedule is the baseline of the ratios.
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter, ValidationError

from benchmarks import with_defaults
from services.trainer.elbo import bound_from, diffusion_elbo, elbo_weighted_loss
from services.trainer.model import MaskedLM, ModelConfig
from services.trainer.train import optimizer_for, set_learning_rate
from shared.corpus import CorpusError, corpus_of, evenly_spaced_windows
from shared.masking import Stage, StageCycle, mask_windows_with_ratio
from shared.settings import Settings, load_settings

IGNORE = -100
PROBE_RATIOS = (0.05, 0.3, 0.5, 0.7, 0.95)

# name -> (stages, loss_weighting); no stages: the preset's. The first is the baseline.
SCHEDULES: dict[str, tuple[list[dict], str | None]] = {
    "seed curriculum: sticky 0.4, random 0.5, span, sticky 0.8": (
        [
            {"type": "sticky", "target_masked_ratio": 0.4, "p1_probability": 0.15,
             "p2_probability": 0.3},
            {"type": "random", "max_masked_ratio": 0.5},
            {"type": "span", "spans_count": 4},
            {"type": "sticky", "target_masked_ratio": 0.8, "p1_probability": 0.1,
             "p2_probability": 0.9},
        ],
        "mean",
    ),
    "the preset's stages": ([], "mean"),
    "the preset's ratios [0, 0.6) and [0, 1), 80/10/10": (
        [{"type": "random", "max_masked_ratio": 0.6}, {"type": "random", "max_masked_ratio": 1.0}],
        "mean",
    ),
    "uniform t in [0.001, 1), [MASK] only": ([{"type": "uniform"}], "mean"),
    "uniform t in [0.001, 1), [MASK] only +elbo": ([{"type": "uniform"}], "elbo"),
    "random, ratio in [0, 0.6) only, 80% [MASK], 20% kept": (
        [{"type": "random", "max_masked_ratio": 0.6, "random_token_probability": 0.0,
          "keep_probability": 0.2}],
        "mean",
    ),
}  # fmt: skip


def train_one(s: Settings, stages: list, weighting: str, corpus, windows: torch.Tensor) -> dict:
    """Train a fresh model on ``stages`` for ``max_iters`` steps; its ELBO and
    masked cross-entropy at a few mask ratios."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    tok = corpus.tokenizer
    model = MaskedLM(ModelConfig.from_settings(s, tok.vocab_size, s.block_size))
    optimizer = optimizer_for(model, s, "cpu")
    cycle = StageCycle(len(stages), [s.seed])
    started = time.monotonic()
    for it in range(s.max_iters):
        stage = stages[cycle.stage_for(it)]
        starts = rng.integers(0, len(corpus.train) - s.block_size + 1, size=s.batch_size)
        rows = np.stack([corpus.train[i : i + s.block_size] for i in starts]).astype(np.int64)
        inputs, labels, t = mask_windows_with_ratio(
            rng, rows, stage, mask_id=tok.mask_id, n_real=tok.n_real, ignore_value=IGNORE
        )
        x, y = torch.from_numpy(inputs), torch.from_numpy(labels)
        if weighting == "elbo":
            logits, _ = model(x)
            loss = elbo_weighted_loss(logits, y, torch.from_numpy(t), IGNORE)
        else:
            _, loss = model(x, y, ignore_index=IGNORE)
        set_learning_rate(optimizer, it, s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
    seconds = time.monotonic() - started
    model.eval()
    bound = bound_from(diffusion_elbo(model, windows, tok.mask_id, nodes=s.elbo_nodes, seed=s.seed))
    probes = []
    generator = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        for ratio in PROBE_RATIOS:
            masked = torch.rand(windows.shape, generator=generator) < ratio
            logits, _ = model(torch.where(masked, tok.mask_id, windows))
            ce = F.cross_entropy(logits.transpose(1, 2), windows, reduction="none")
            probes.append((ce * masked).sum().item() / max(1, masked.sum().item()))
    return {"bound": bound, "probes": probes, "seconds": seconds}


def main(argv: list[str]) -> int:
    chosen = None
    rest = []
    for arg in argv:
        if arg.startswith("--schedules="):
            try:
                lists = json.loads(arg.split("=", 1)[1])
            except json.JSONDecodeError as exc:
                sys.exit(f"bench-masking: --schedules is not JSON ({exc})")
            if (
                not lists
                or not isinstance(lists, list)
                or not all(isinstance(x, list) and x for x in lists)
            ):
                sys.exit("bench-masking: --schedules takes a JSON list of non-empty stage lists")
            chosen = {f"schedule {i}": (stages, None) for i, stages in enumerate(lists)}
        else:
            rest.append(arg)
    s = load_settings(with_defaults(rest), env={}, service=Settings)
    torch.set_num_threads(s.torch_threads or torch.get_num_threads())
    try:
        corpus = corpus_of(s)
    except CorpusError as exc:
        sys.exit(f"bench-masking: {exc}")
    n = 256
    windows = torch.from_numpy(evenly_spaced_windows(corpus.val, n, s.block_size))
    adapter = TypeAdapter(Stage)
    schedules = chosen or SCHEDULES
    print(
        f"bench-masking: {s.n_layer} layers x {s.n_head} heads x {s.n_embd}, "
        f"{s.max_iters} steps of {s.batch_size} x {s.block_size}, learning rate "
        f"{s.learning_rate:g}"
        + (f", Muon {s.muon_learning_rate:g}" if s.optimizer == "muon" else " (AdamW)")
        + f"; ELBO on {n} validation windows, {s.elbo_nodes} nodes"
    )
    header = " ".join(f"{f't={r:g}':>7}" for r in PROBE_RATIOS)
    print(f"\n{'':81}masked cross-entropy (nats) at mask ratio")
    print(f"{'schedule':58} {'ELBO':>7} {'± se':>6} {'ratio':>6}  {header}")
    parsed: dict[str, list] = {}
    for name, (stages, _weighting) in schedules.items():  # every schedule checked first
        try:
            parsed[name] = [adapter.validate_python(st) for st in stages] or s.unmasking_stages
        except ValidationError as exc:
            sys.exit(f"bench-masking: {name}: a stage is not valid:\n{exc}")
    baseline = math.nan
    for name, (_stages, weighting) in schedules.items():
        result = train_one(s, parsed[name], weighting or s.loss_weighting, corpus, windows)
        nats = result["bound"].nats
        baseline = nats if math.isnan(baseline) else baseline
        probes = " ".join(f"{v:7.3f}" for v in result["probes"])
        print(
            f"{name[:58]:58} {nats:7.4f} {result['bound'].stderr:6.4f} {nats / baseline:6.3f}"
            f"  {probes}   ({result['seconds']:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
