"""Muon for the Transformer's hidden matrices, AdamW for everything else, in one
optimizer object (one ``state_dict`` for checkpoints, one ``step`` for the
gradient scaler).

Muon ("momentum, orthogonalized") keeps a heavy-ball momentum of each weight
matrix's gradient and, instead of following it directly, follows its nearest
semi-orthogonal matrix: every singular value of the update is pushed to about
1, so rare directions of the gradient move as fast as dominant ones. The
orthogonalization is a few Newton–Schulz iterations of an odd quintic
polynomial, matmuls only, no SVD. It suits the 2-D weights inside the blocks;
the embedding (tied to the output head), biases and norm gains stay with AdamW.

Each group carries ``kind`` (``"muon"`` or ``"adamw"``) and ``lr_scale``: the
training loop sets ``lr = schedule(it) * lr_scale``, so both follow one
warmup/cosine schedule, Muon at its own peak. ``optimizer="adamw"`` runs never
build this class (see :meth:`MaskedLM.configure_optimizer`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

# Coefficients of the quintic x -> a x + b x^3 + c x^5 applied to the singular
# values: steep at 0 so small singular values grow fast, and 5 iterations take
# every value in (0, 1] to roughly [0.7, 1.2], which is all Muon needs.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(g: Tensor, steps: int = NS_STEPS) -> Tensor:
    """Approximately U V^T of each matrix in ``g`` (..., rows, cols), computed
    in float32. The input is first scaled to Frobenius norm 1, which bounds the
    spectral norm by 1 (the iteration's domain)."""
    a, b, c = _NS_COEFFS
    x = g.float()
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class MuonAdamW(torch.optim.Optimizer):
    """Groups with ``kind="muon"`` take (Nesterov) Muon steps, groups with
    ``kind="adamw"`` take AdamW steps (decoupled weight decay, bias correction)."""

    def __init__(self, groups: list[dict], *, betas: tuple[float, float], eps: float = 1e-8):
        for group in groups:
            kind = group.get("kind")
            if kind not in ("muon", "adamw"):
                raise ValueError(f"optimizer group kind {kind!r}: expected 'muon' or 'adamw'")
            if kind == "muon" and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only")
        defaults = {"lr": 1e-3, "lr_scale": 1.0, "weight_decay": 0.0, "momentum": 0.95,
                    "betas": betas, "eps": eps}  # fmt: skip
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        by_shape: dict[tuple[int, ...], list[tuple[Tensor, Tensor]]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            by_shape[tuple(p.shape)].append((p, p.grad.add(buf, alpha=mu)))
        # Matrices of one shape are orthogonalized together: one batched matmul
        # chain per shape instead of one per matrix.
        for (rows, cols), pairs in by_shape.items():
            updates = orthogonalize(torch.stack([u for _, u in pairs]))
            # Unit spectral norm per update; taller matrices step a little more
            # so that the update's RMS does not shrink with their aspect ratio.
            step = lr * math.sqrt(max(1.0, rows / cols))
            for (p, _), update in zip(pairs, updates, strict=True):
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-step)

    def _adamw(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            if wd:
                p.mul_(1.0 - lr * wd)
            state["exp_avg"].lerp_(p.grad, 1.0 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            denom = (state["exp_avg_sq"] / (1.0 - beta2**t)).sqrt_().add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1.0 - beta1**t))
