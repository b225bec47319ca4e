"""The likelihood bounds on models whose answer is known exactly."""

from __future__ import annotations

import math

import torch
from torch import nn

from services.trainer.elbo import (
    autoregressive_nll,
    bound_from,
    bound_from_sums,
    diffusion_elbo,
    elbo_weighted_loss,
    quadrature,
    windows_of,
)
from services.trainer.model import MaskedLM, ModelConfig

VOCAB, MASK, LENGTH = 12, 11, 32


class FixedDistribution(nn.Module):
    """Predicts the same distribution at every position, whatever the input:
    a model that ignores context."""

    def __init__(self, log_probs: torch.Tensor) -> None:
        super().__init__()
        self.log_probs = nn.Parameter(log_probs, requires_grad=False)

    def forward(self, idx: torch.Tensor, targets=None):
        return self.log_probs.expand(*idx.shape, -1).clone(), None


def corpus_windows(n: int = 400, seed: int = 0) -> torch.Tensor:
    """Windows over 11 real tokens with a skewed unigram distribution."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.tensor([0.3, 0.2, 0.1, 0.1, 0.08, 0.07, 0.05, 0.04, 0.03, 0.02, 0.01])
    return torch.multinomial(probs, n * LENGTH, replacement=True, generator=g).view(n, LENGTH)


def test_quadrature_integrates_polynomials_exactly():
    t, w = quadrature(8)
    assert abs(w.sum() - 1.0) < 1e-12 and ((t > 0) & (t < 1)).all()
    for k in range(15):  # 8 Gauss-Legendre nodes: exact up to degree 15
        assert abs((w * t**k).sum() - 1 / (k + 1)) < 1e-12


def test_a_uniform_model_bounds_at_ln_vocab_within_its_error():
    windows = corpus_windows()
    model = FixedDistribution(torch.zeros(VOCAB))
    bound = bound_from(diffusion_elbo(model, windows, MASK, nodes=8, draws=2, seed=3))
    assert abs(bound.nats - math.log(VOCAB)) < 4 * bound.stderr + 1e-9, bound
    assert bound.windows == windows.shape[0]
    # The autoregressive figure of the same model has no sampling noise at all.
    nll = autoregressive_nll(model, windows)
    assert torch.allclose(nll, torch.full_like(nll, math.log(VOCAB)))


def test_a_context_free_model_bounds_at_the_cross_entropy_of_its_unigram():
    windows = corpus_windows()
    counts = torch.bincount(windows.flatten(), minlength=VOCAB).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    exact = -log_probs[windows].mean().item()  # what the bound must equal in expectation
    model = FixedDistribution(log_probs.float())
    bound = bound_from(diffusion_elbo(model, windows, MASK, nodes=16, draws=2, seed=5))
    assert abs(bound.nats - exact) < 4 * bound.stderr, (bound, exact)
    assert bound.stderr < 0.02


def test_the_figure_does_not_depend_on_how_ranks_split_the_windows():
    windows = corpus_windows(n=30)
    torch.manual_seed(0)
    model = MaskedLM(
        ModelConfig(vocab_size=VOCAB, block_size=LENGTH, n_layer=1, n_head=2, n_embd=16)
    )
    model.eval()
    whole = diffusion_elbo(model, windows, MASK, nodes=4, seed=9)
    parts = [
        diffusion_elbo(model, windows, MASK, nodes=4, seed=9, rows=slice(r, None, 3))
        for r in range(3)
    ]
    total = sum(p.sum().item() for p in parts)
    squares = sum((p**2).sum().item() for p in parts)
    split = bound_from_sums(total, squares, sum(p.numel() for p in parts))
    assert abs(split.nats - bound_from(whole).nats) < 1e-9
    assert abs(split.stderr - bound_from(whole).stderr) < 1e-9


def test_windows_are_rebuilt_from_wire_batches():
    original = corpus_windows(n=2)
    selected = torch.zeros_like(original, dtype=torch.bool)
    selected[:, ::3] = True
    inputs = torch.where(selected, torch.full_like(original, MASK), original)
    labels = torch.where(selected, original, torch.full_like(original, 255))
    assert torch.equal(windows_of(inputs, labels, 255), original)


def test_a_causal_model_never_looks_ahead():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, block_size=LENGTH, n_layer=2, n_head=2, n_embd=16)
    causal = MaskedLM(ModelConfig(**{**config.__dict__, "causal": True})).eval()
    x = corpus_windows(n=1)
    y = x.clone()
    y[0, 20:] = (y[0, 20:] + 1) % MASK  # change only the future of position 19
    with torch.no_grad():
        a, b = causal(x)[0], causal(y)[0]
    assert torch.allclose(a[0, :20], b[0, :20], atol=1e-6)
    assert not torch.allclose(a[0, 20:], b[0, 20:])


def test_elbo_weighting_divides_each_rows_sum_by_t_times_length():
    """Uniform logits: every selected position costs ln V, so a row with k of L
    positions selected at ratio t contributes k·ln V / (t·L); rows are averaged."""
    logits = torch.zeros(2, LENGTH, VOCAB)
    targets = torch.full((2, LENGTH), -100)
    targets[0, :4] = 3  # 4 selected, t = 0.25
    targets[1, :16] = 5  # 16 selected, t = 0.5
    ratio = torch.tensor([0.25, 0.5])
    loss = elbo_weighted_loss(logits, targets, ratio, -100)
    rows = [4 * math.log(VOCAB) / (0.25 * LENGTH), 16 * math.log(VOCAB) / (0.5 * LENGTH)]
    assert math.isclose(loss.item(), sum(rows) / 2, rel_tol=1e-6)
