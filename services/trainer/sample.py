"""Sample from a trained masked LM by iterative unmasking, and measure how well
it fills in masked characters.

Read top to bottom: loading a checkpoint, the cosine unmasking schedule,
``generate`` (start from all-[MASK], commit the most confident draws step by
step), ``reconstruction_accuracy`` (one-shot fill-in at a fixed mask ratio),
``sample_entropy``, then the command line::

    python -m services.trainer.sample --checkpoint=out/ckpt.pt --prompt="ROMEO:" \\
        --length=200 --steps=50 --mask_ratios=0.15,0.5,0.9

Sampling draws its Gumbel noise in float64 (float32 noise
measurably lowers diversity), a cosine schedule for how many positions stay
masked, and the sample's character entropy printed beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from services.trainer.checkpoint import Checkpoint, CheckpointError
from services.trainer.elbo import autoregressive_nll, bound_from, diffusion_elbo
from services.trainer.model import MaskedLM
from shared.corpus import CorpusError, evenly_spaced_windows, load_corpus
from shared.exit_codes import ExitCode
from shared.settings import DataSettings


class SampleError(Exception):
    """A usage mistake (bad checkpoint, prompt, corpus); the message says what to fix."""


def load_model(path: str | Path, device: str | torch.device) -> tuple[MaskedLM, Checkpoint]:
    """The model of a trainer checkpoint, on ``device`` and in eval mode, and the
    checkpoint itself (itos, mask_token_id, iter_num, settings, ...). Raises
    ``CheckpointError`` for a missing or unreadable file."""
    checkpoint = Checkpoint.load(
        Path(path), device, missing="give the ckpt.pt a training run wrote (out_dir/ckpt.pt)"
    )
    return checkpoint.build_model(device).eval(), checkpoint


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the caller's mode comes back."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- sampling


def unmask_schedule(length: int, steps: int) -> list[int]:
    """How many positions to commit at each of ``steps`` steps.

    After step s of S, floor(length * cos(pi/2 * s/S)) positions stay masked
    (MaskGIT's cosine schedule: few commits early, when the model sees little
    context, many late). Every step commits at least one while any remain, so
    with steps > length the last steps commit nothing; all are committed by
    the last step.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    counts, remaining = [], length
    for step in range(1, steps + 1):
        target = 0 if step == steps else math.floor(length * math.cos(math.pi / 2 * step / steps))
        n = min(remaining, max(1, remaining - target)) if remaining else 0
        counts.append(n)
        remaining -= n
    return counts


def _draw(
    logits: Tensor,
    mask_id: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """One token per position from softmax(logits / temperature) cut to top_k,
    never [MASK]; returns (tokens, confidence) where confidence is the model's
    own probability (temperature 1, before top_k) of the drawn token."""
    scores = logits.to(torch.float64, copy=True)
    scores[..., mask_id] = -math.inf
    confidence_of = torch.softmax(scores, dim=-1)
    if temperature > 0:
        scores = scores / temperature
        if top_k is not None and top_k < scores.size(-1) - 1:
            kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        # Gumbel-max: argmax(log p + g) with g ~ Gumbel(0, 1) samples from p.
        noise_device = generator.device if generator is not None else scores.device
        uniform = torch.rand(
            scores.shape, dtype=torch.float64, generator=generator, device=noise_device
        ).to(scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
        scores = scores + gumbel
    tokens = scores.argmax(dim=-1)
    return tokens, confidence_of.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def generate(
    model: MaskedLM,
    prompt_ids: Tensor | Sequence[int],
    length: int,
    steps: int,
    *,
    mask_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
    order: str = "confidence",
) -> Tensor:
    """The prompt followed by ``length`` generated tokens.

    ``prompt_ids`` is (P,) or a batch (B, P); the result has the same rank.
    The sequence starts as prompt + ``length`` [MASK]s. Each step runs the
    model on it, draws a token for every masked position (float64 Gumbel-max
    over softmax(logits / temperature), top_k, never [MASK]; temperature 0 is
    greedy), and commits the drawn tokens the model is most confident of, as
    many as :func:`unmask_schedule` says; the rest stay [MASK] and are redrawn
    next step. Prompt tokens never change. ``on_step(step, ids)`` (step from 1)
    sees the sequence after each step's commits (with steps > length the
    steps left once nothing is masked are skipped). ``generator`` (on the model's
    device, or CPU) makes the draws reproducible. ``order="random"`` commits
    uniformly random masked positions instead of the most confident ones: the
    model's own (ancestral) distribution, which repeats itself far less.
    """
    if order not in ("confidence", "random"):
        raise ValueError(f"order={order!r}: use confidence or random")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    if length < 0:
        raise ValueError(f"length={length} must be >= 0")
    schedule = unmask_schedule(length, steps)
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    batched = prompt.dim() == 2
    if not batched:
        prompt = prompt.view(1, -1)
    total = prompt.size(1) + length
    if total > model.config.block_size:
        raise ValueError(
            f"prompt ({prompt.size(1)}) + length ({length}) = {total} tokens exceeds "
            f"block_size={model.config.block_size}; shorten the prompt or the length"
        )
    if ((prompt < 0) | (prompt >= model.config.vocab_size) | (prompt == mask_id)).any():
        raise ValueError("prompt_ids must be real token ids (not [MASK], within the vocabulary)")

    ids = torch.cat([prompt, prompt.new_full((prompt.size(0), length), mask_id)], dim=1)
    with _evaluating(model):
        for step, n_commit in enumerate(schedule, start=1):
            if n_commit == 0:
                break  # everything committed already (steps > length)
            masked = ids == mask_id
            logits, _ = model(ids)
            tokens, confidence = _draw(logits, mask_id, temperature, top_k, generator)
            if order == "random":
                noise_device = generator.device if generator is not None else ids.device
                confidence = torch.rand(
                    ids.shape, dtype=torch.float64, generator=generator, device=noise_device
                ).to(ids.device)
            # Only masked positions compete; every row has the same number masked.
            confidence = confidence.masked_fill(~masked, -math.inf)
            chosen = torch.topk(confidence, n_commit, dim=-1).indices
            ids = ids.scatter(1, chosen, tokens.gather(1, chosen))
            if on_step is not None:
                on_step(step, ids if batched else ids[0])
    return ids if batched else ids[0]


@torch.no_grad()
def generate_autoregressive(
    model: MaskedLM,
    prompt_ids: Sequence[int],
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    mask_id: int,
) -> Tensor:
    """The prompt and ``length`` characters drawn one at a time from a causal
    model (the autoregressive baseline), float64 Gumbel-max as above, never
    [MASK]. Without a prompt it starts from the vocabulary's first character
    (a newline in Tiny Shakespeare), which is not returned."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device).view(1, -1)
    if ids.numel() == 0:  # no prompt: start from a newline, as nanoGPT does
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        start = 1
    else:
        start = 0
    if ids.size(1) + length > model.config.block_size:
        raise ValueError(
            f"prompt + length = {ids.size(1) + length} exceeds block_size={model.config.block_size}"
        )
    with _evaluating(model):
        for _ in range(length):
            logits, _ = model(ids)
            token, _ = _draw(logits[:, -1:], mask_id, temperature, top_k, generator)
            ids = torch.cat([ids, token], dim=1)
    return ids[0, start:]


@torch.no_grad()
def judge_nll(judge: MaskedLM, ids: Sequence[int], prompt_len: int) -> float:
    """Mean negative log-likelihood (nats/char) of ``ids[prompt_len:]`` under a
    causal ``judge`` model given everything before each character: the
    "generative perplexity" is exp of it. The first character is given."""
    device = next(judge.parameters()).device
    x = torch.as_tensor(list(ids), dtype=torch.long, device=device).view(1, -1)
    with _evaluating(judge):
        logits, _ = judge(x[:, :-1])
    ce = F.cross_entropy(logits[0].float(), x[0, 1:], reduction="none")
    first = max(prompt_len - 1, 0)
    return ce[first:].mean().item()


# -------------------------------------------------------------- evaluation


def reconstruction_accuracy(
    model: MaskedLM,
    windows: Tensor | np.ndarray,
    mask_ratio: float,
    mask_id: int,
    generator: torch.Generator | None = None,
    *,
    batch_size: int = 64,
) -> float:
    """Fraction of masked positions the model predicts exactly.

    Each (N, T) window gets exactly round(mask_ratio * T) random positions
    replaced by [MASK] (positions drawn with ``generator``, a CPU generator);
    one forward pass, argmax over the real tokens, compared with the originals.
    """
    windows = torch.as_tensor(np.asarray(windows, dtype=np.int64))
    if windows.dim() != 2 or windows.numel() == 0:
        raise ValueError(f"windows must be a non-empty (N, T) array, got {tuple(windows.shape)}")
    n_windows, T = windows.shape
    n_masked = round(mask_ratio * T)
    if not 1 <= n_masked <= T:
        raise ValueError(f"mask_ratio={mask_ratio} masks {n_masked} of {T} positions; need 1..{T}")
    # The first n_masked positions of a random permutation, per window.
    order = torch.rand(n_windows, T, generator=generator).argsort(dim=1)
    selected = torch.zeros(n_windows, T, dtype=torch.bool).scatter(1, order[:, :n_masked], True)
    device = next(model.parameters()).device
    correct = 0
    with _evaluating(model):
        for start in range(0, n_windows, batch_size):
            target = windows[start : start + batch_size].to(device)
            sel = selected[start : start + batch_size].to(device)
            logits, _ = model(target.masked_fill(sel, mask_id))
            logits[..., mask_id] = -math.inf
            correct += int((logits.argmax(dim=-1) == target)[sel].sum())
    return correct / (n_windows * n_masked)


def sample_entropy(text: str) -> float:
    """Entropy in bits per character of the character frequencies of ``text``
    (0 for an empty or one-symbol string). A collapsed, repetitive sample
    scores far below the corpus (~4.5 bits for English prose)."""
    if not text:
        return 0.0
    n = len(text)
    return max(0.0, -sum(c / n * math.log2(c / n) for c in Counter(text).values()))


# ---------------------------------------------------------- command line


def validation_windows(
    checkpoint: Checkpoint, n_windows: int, window: int, corpus_path: Path | None = None
) -> tuple[np.ndarray, int]:
    """``n_windows`` evenly spaced windows of the validation split of the run's
    corpus, each min(window, len(val)) long; returns (windows, window length).

    The corpus is read as the producers read it: ``corpus_path`` (else the
    CORPUS_PATH environment variable), else the named corpus of the run's
    contract from its URL/cache, split at the contract's train_val_split; the
    vocabulary must be the checkpoint's.
    """
    # The contract names the corpus; settings of older checkpoints may hold more.
    settings = {**checkpoint.settings, **checkpoint.meta}
    defaults = DataSettings.model_fields

    def setting(key: str) -> Any:
        value = settings.get(key)
        return defaults[key].get_default() if value is None else value

    corpus_path = (
        corpus_path or checkpoint.settings.get("corpus_path") or os.environ.get("CORPUS_PATH")
    )
    try:
        corpus = load_corpus(
            corpus_path=Path(corpus_path).expanduser() if corpus_path else None,
            corpus=setting("corpus"),
            corpus_url=setting("corpus_url"),
            corpus_sha256=setting("corpus_sha256"),
            cache_dir=Path(setting("cache_dir")).expanduser(),
            train_val_split=float(setting("train_val_split")),
        )
    except CorpusError as exc:
        raise SampleError(f"cannot load the run's corpus for evaluation: {exc}") from exc
    if corpus.tokenizer.itos != list(checkpoint.itos):
        raise SampleError(
            f"the corpus {corpus.name} has a different vocabulary "
            f"({corpus.tokenizer.vocab_size} symbols) than the checkpoint "
            f"({len(checkpoint.itos)}); was the corpus file changed since training?"
        )
    val = corpus.val
    length = min(window, len(val))
    if length < 2:
        raise SampleError(f"the validation split of {corpus.name} has {len(val)} characters")
    return evenly_spaced_windows(val, n_windows, length), length


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list") from None
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise argparse.ArgumentTypeError(f"mask ratios must lie in (0, 1], got '{text}'")
    return ratios


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.trainer.sample",
        description="Sample from a masked-LM checkpoint by iterative unmasking; "
        "optionally measure reconstruction accuracy on the run's validation split.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="trainer checkpoint (.pt)")
    parser.add_argument("--prompt", default="", help="text the sample continues (kept as is)")
    parser.add_argument(
        "--length", type=int, default=None, help="characters to generate (default: fill the block)"
    )
    parser.add_argument("--steps", type=int, default=64, help="unmasking steps")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--show_steps", action="store_true", help="print the text after each step")
    parser.add_argument(
        "--mask_ratios", type=_ratios, default=None, help="e.g. 0.15,0.5,0.9: report accuracy"
    )
    parser.add_argument("--eval_windows", type=int, default=64, help="validation windows")
    parser.add_argument(
        "--order",
        choices=("confidence", "random"),
        default="confidence",
        help="which masked positions a step commits: the most confident, or random ones",
    )
    parser.add_argument(
        "--elbo",
        action="store_true",
        help="the likelihood bound on the run's validation split (diffusion ELBO, or a causal "
        "checkpoint's NLL) in nats and bits per character",
    )
    parser.add_argument("--elbo_windows", type=int, default=256, help="windows for --elbo")
    parser.add_argument(
        "--corpus_path",
        type=Path,
        default=None,
        help="the run's corpus file, for --elbo and --mask_ratios (default: CORPUS_PATH, "
        "else the contract's named corpus, downloaded)",
    )
    parser.add_argument("--elbo_nodes", type=int, default=8, help="quadrature nodes for --elbo")
    parser.add_argument(
        "--judge",
        type=Path,
        default=None,
        help="an autoregressive checkpoint (objective=ar): report the sample's NLL under it "
        "(generative perplexity)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Every argument's range, before anything is loaded or sampled."""
    if (args.length is not None and args.length < 0) or args.steps < 1 or args.eval_windows < 1:
        raise SampleError("--length must be >= 0, --steps and --eval_windows >= 1")
    if args.elbo_windows < 1 or args.elbo_nodes < 1:
        raise SampleError("--elbo_windows and --elbo_nodes must be >= 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise SampleError(f"--temperature must be a finite number >= 0, not {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise SampleError("--top_k must be >= 1")
    if not 0 <= args.seed < 2**63:
        raise SampleError(f"--seed must be from 0 to 2^63 - 1, not {args.seed}")


def _run(args: argparse.Namespace) -> None:
    _check_arguments(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SampleError("--device=cuda but no CUDA device is available; use --device=cpu")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    model, checkpoint = load_model(args.checkpoint, device)
    itos: list[str] = list(checkpoint.itos)
    mask_id = checkpoint.mask_token_id
    judge = None
    if args.judge is not None:  # checked before sampling, which can take a while
        judge, judged = load_model(args.judge, device)
        if not judge.config.causal:
            raise SampleError(
                f"--judge={args.judge} is a masked-diffusion checkpoint: the judge is an "
                "autoregressive one (a run with --objective=ar)"
            )
        if list(judged.itos) != itos:
            raise SampleError(
                f"--judge={args.judge} has another vocabulary than --checkpoint: judge with an "
                "autoregressive run on the same corpus"
            )
    stoi = {s: i for i, s in enumerate(itos) if i != mask_id}
    unknown = sorted({c for c in args.prompt if c not in stoi})
    if unknown:
        raise SampleError(
            f"prompt characters not in the model's vocabulary: {', '.join(map(repr, unknown))}"
        )
    block = model.config.block_size
    # An autoregressive sample without a prompt starts from a newline, one position more.
    start = 1 if model.config.causal and not args.prompt else 0
    if args.length is None:
        args.length = max(0, block - len(args.prompt) - start)
    if len(args.prompt) + start + args.length > block:
        raise SampleError(
            f"prompt ({len(args.prompt)}) + --length ({args.length}) exceeds the model's "
            f"block_size={block}"
        )

    def decode(ids: Tensor, shown_mask: str) -> str:
        return "".join(shown_mask if i == mask_id else itos[i] for i in ids.tolist())

    def show(step: int, ids: Tensor) -> None:
        print(f"-- step {step}/{args.steps} --\n{decode(ids, '_')}")

    print(
        f"checkpoint {args.checkpoint} (iter {checkpoint.iter_num}, "
        f"{model.num_params() / 1e6:.2f}M parameters) on {device}"
    )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt_ids = [stoi[c] for c in args.prompt]
    if model.config.causal:  # the autoregressive baseline: one character at a time
        ids = generate_autoregressive(
            model,
            prompt_ids,
            args.length,
            temperature=args.temperature,
            top_k=args.top_k,
            generator=generator,
            mask_id=mask_id,
        )
    else:
        ids = generate(
            model,
            prompt_ids,
            args.length,
            args.steps,
            mask_id=mask_id,
            temperature=args.temperature,
            top_k=args.top_k,
            generator=generator,
            on_step=show if args.show_steps else None,
            order=args.order,
        )
    text = decode(ids, "[MASK]")
    how = "autoregressive" if model.config.causal else f"{args.steps} steps, {args.order} order"
    print(f"-- sample: prompt {len(args.prompt)} + {args.length} generated characters ({how}) --")
    print(text)
    print("--")
    generated = text[len(args.prompt) :]
    print(f"entropy of the generated text: {sample_entropy(generated):.3f} bits/char")
    if judge is not None:
        nll = judge_nll(judge, ids.tolist(), len(args.prompt))
        print(
            f"judge NLL of the generated text: {nll:.4f} nats/char "
            f"(generative perplexity {math.exp(nll):.3f}) under {args.judge}"
        )
    if args.elbo:
        windows, _ = validation_windows(checkpoint, args.elbo_windows, block, args.corpus_path)
        windows_t = torch.as_tensor(windows)
        if model.config.causal:
            bound = bound_from(autoregressive_nll(model, windows_t))
            kind = "AR NLL"
        else:
            values = diffusion_elbo(
                model, windows_t, mask_id, nodes=args.elbo_nodes, seed=args.seed
            )
            bound, kind = bound_from(values), "ELBO"
        print(f"validation {kind}: {bound}")

    if args.mask_ratios:
        windows, window = validation_windows(checkpoint, args.eval_windows, block, args.corpus_path)
        for ratio in args.mask_ratios:
            if round(ratio * window) < 1:
                raise SampleError(f"mask ratio {ratio} masks no position of a {window}-long window")
            accuracy = reconstruction_accuracy(
                model, windows, ratio, mask_id, torch.Generator().manual_seed(args.seed)
            )
            print(
                f"reconstruction accuracy at mask ratio {ratio:g}: {accuracy:.4f} "
                f"({len(windows)} validation windows of {window}, "
                f"chance {1 / (len(itos) - 1):.4f})"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse exits with 2 on its own errors
    try:
        _run(args)
    except (SampleError, ValueError) as exc:  # ValueError: arguments generate() refuses
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.CONTRACT
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
