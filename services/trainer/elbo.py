"""How good is the model: likelihood bounds in nats (and bits) per character,
comparable with an autoregressive model's NLL on the same windows.

Masked ("absorbing") diffusion with a linear schedule bounds the negative
log-likelihood of a window x of L characters by

    -log p(x) / L  <=  ∫₀¹ E_{x_t}[ Σ_{i masked} -log p(x_i | x_t) ] / (t L) dt

where x_t replaces each position by [MASK] independently with probability t
(no 80/10/10 corruption). :func:`diffusion_elbo` estimates the integral with
Gauss–Legendre quadrature over t and, per node, mask draws fixed by a seed,
on fixed windows: the figure is the same for every run, world size and
device. Its standard error is taken across windows.

:func:`autoregressive_nll` is the baseline's figure on the same windows:
the mean next-character cross-entropy of a causal model (each window's first
character has no context and is not scored, as in nanoGPT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Bound:
    nats: float  # per character
    stderr: float  # standard error of ``nats`` across windows
    windows: int

    @property
    def bits(self) -> float:
        return self.nats / LN2

    def last_line(self, kind: str) -> str:
        """What a run prints last: ``val ELBO 3.2539 bits/char (2.2554 ± ...)``."""
        return (
            f"val {kind} {self.bits:.4f} bits/char ({self.nats:.4f} ± {self.stderr:.4f} "
            f"nats/char, {self.windows} validation windows)"
        )

    def __str__(self) -> str:
        return (
            f"{self.nats:.4f} ± {self.stderr:.4f} nats/char = {self.bits:.4f} bits/char "
            f"({self.windows} windows)"
        )


def windows_of(inputs: Tensor, labels: Tensor, ignore_value: int) -> Tensor:
    """Original windows from wire batches: the label where there is one,
    else the input (the wire format's reconstruction rule)."""
    return torch.where(labels != ignore_value, labels, inputs).long()


def quadrature(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes and weights on [0, 1] (weights sum to 1)."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    return (x + 1.0) / 2.0, w / 2.0


@torch.no_grad()
def diffusion_elbo(
    model: torch.nn.Module,
    windows: Tensor,
    mask_id: int,
    *,
    nodes: int = 8,
    draws: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    rows: slice | None = None,
) -> Tensor:
    """The bound of each window in ``windows[rows]`` (``windows``: long,
    (N, L)), in nats/char, float64.

    The masks are drawn for all N windows in one fixed order from ``seed``,
    whatever ``rows`` is, so splitting the windows between ranks never
    changes the figure."""
    n, length = windows.shape
    t, weight = quadrature(nodes)
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand((n, nodes, draws, length), generator=generator)
    rows = rows or slice(0, n)
    x_all, u_all = windows[rows], uniform[rows]
    device = next(model.parameters()).device
    ratio = torch.tensor(t, dtype=torch.float32).repeat_interleave(draws)  # (nodes*draws,)
    scale = torch.tensor(weight, dtype=torch.float64).repeat_interleave(draws) / draws
    per_window = torch.zeros(x_all.shape[0], dtype=torch.float64)
    k = nodes * draws
    step = max(1, batch_size // k)  # windows per forward pass
    for start in range(0, x_all.shape[0], step):
        x = x_all[start : start + step].to(device)  # (b, L)
        b = x.shape[0]
        u = u_all[start : start + step].reshape(b * k, length).to(device)
        r = ratio.to(device).repeat(b)  # (b*k,)
        xs = x.repeat_interleave(k, dim=0)  # (b*k, L)
        masked = u < r[:, None]
        logits, _ = model(torch.where(masked, torch.full_like(xs, mask_id), xs))
        ce = F.cross_entropy(logits.float().transpose(1, 2), xs, reduction="none")
        term = (ce * masked).sum(dim=1).double() / (r.double() * length)  # (b*k,)
        per_window[start : start + b] = (term.cpu().view(b, k) * scale).sum(dim=1)
    return per_window


def elbo_weighted_loss(logits: Tensor, targets: Tensor, ratio: Tensor, ignore_index: int) -> Tensor:
    """The training loss of ``loss_weighting=elbo``: each row's masked
    cross-entropy sum divided by t·L (``ratio``: each row's t, (B,)), averaged
    over rows."""
    ce = F.cross_entropy(
        logits.float().transpose(1, 2), targets, ignore_index=ignore_index, reduction="none"
    )
    return (ce.sum(dim=1) / (ratio.float().clamp(min=1e-6) * targets.shape[1])).mean()


def bound_from(per_window: Tensor) -> Bound:
    """Mean and standard error of per-window bounds."""
    return bound_from_sums(
        per_window.sum().item(), (per_window**2).sum().item(), per_window.numel()
    )


def bound_from_sums(total: float, squares: float, n: int) -> Bound:
    """A bound from the sum, the sum of squares and the count of per-window
    values (what ranks all-reduce)."""
    mean = total / max(n, 1)
    variance = (squares - n * mean * mean) / (n - 1) if n > 1 else math.nan
    stderr = math.sqrt(max(variance, 0.0) / n) if n > 1 else math.nan
    return Bound(mean, stderr, n)


@torch.no_grad()
def autoregressive_nll(
    model: torch.nn.Module, windows: Tensor, *, batch_size: int = 64, rows: slice | None = None
) -> Tensor:
    """Each window's mean next-character cross-entropy (nats/char, float64)
    for ``windows[rows]``, under a causal ``model``."""
    part = windows[rows or slice(0, windows.shape[0])]
    device = next(model.parameters()).device
    out = []
    for start in range(0, part.shape[0], batch_size):
        x = part[start : start + batch_size].to(device)
        logits, _ = model(x[:, :-1])
        ce = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")
        out.append(ce.double().mean(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
