"""The trainer's guard against a diverging model.

Every step, after the backward pass: clip the gradient (``grad_clip``) and, when it
is not finite (NaN or inf anywhere: the model diverged; under float16, also an
overflow that the loss scaler skips by design), zero it and the optimizer's momentum,
so that the step changes nothing. All of that runs on the device, without a host
sync; the guard counts such steps there and the loop reads the counters at each log
interval (:meth:`DivergenceGuard.check`), where ``max_nonfinite_steps`` in a row stop
the run with :class:`TrainingDiverged`. No checkpoint is written during a streak or
over weights that are not finite (:meth:`DivergenceGuard.blocks_checkpoint`).

Every rank takes the same decisions at the same iterations: the gradient is
all-reduced before the guard sees it, and the weights are the same everywhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from services.trainer import metrics

log = logging.getLogger(__name__)

# A float16 loss scaler overflows now and then by design (it skips the step and halves
# its scale): a streak up to this long is not divergence (2**10 below the scale that
# last overflowed).
FLOAT16_OVERFLOW_STREAK = 10
RESTART_ADVICE = (
    "a lower --learning_rate (or --muon_learning_rate), a smaller --grad_clip, or "
    "--dtype=bfloat16 instead of float16"
)


class TrainingDiverged(RuntimeError):
    """Steps in a row with a non-finite gradient (``max_nonfinite_steps`` of them), or
    weights that are not finite when training ends."""

    def __init__(self, message: str, iter_num: int) -> None:
        super().__init__(message)
        self.iter_num = iter_num


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``tensors`` together, on their device (inf when it overflows)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


class DivergenceGuard:
    """One rank's guard. ``announce``: this rank logs and counts the metric (the first);
    ``checkpointed_iter``: the iteration of the checkpoint on disk, if any, for the stop
    message (:meth:`checkpointed` keeps it current)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        *,
        grad_clip: float,
        max_nonfinite_steps: int,
        ckpt_path: Path,
        checkpointed_iter: int | None,
        announce: bool,
    ) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.grad_clip, self.limit = grad_clip, max_nonfinite_steps
        self.ckpt_path, self.checkpointed_iter = ckpt_path, checkpointed_iter
        self.announce = announce
        self.tolerated = FLOAT16_OVERFLOW_STREAK if scaler.is_enabled() else 0
        device = next(model.parameters()).device
        # Steps whose gradient was not finite, on the device: in a row now, the longest
        # streak since the last read, and in all beyond the tolerated streak.
        self.run = torch.zeros((), dtype=torch.long, device=device)
        self.longest = torch.zeros((), dtype=torch.long, device=device)
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0  # ``total`` at the last read

    def step(self) -> None:
        """After the backward pass, before the optimizer step: clip the gradient and
        neutralize it when it is not finite (its update is then nothing, AdamW's weight
        decay aside). No host sync."""
        self.scaler.unscale_(self.optimizer)  # a no-op unless the float16 scaler is on
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        else:
            norm = total_norm(grads)
        finite = torch.isfinite(norm)
        zero = norm.new_zeros(())
        for g in grads:
            torch.where(finite, g, zero.to(g.dtype), out=g)
        # The float16 scaler skips such a step outright (momentum untouched): only without
        # it would the momentum of earlier steps still move the weights (Muon would take
        # full steps on zero gradients). Listed every step rather than cached: the state
        # is created by the first step and replaced on resume.
        momentum = (
            [
                buf
                for state in self.optimizer.state.values()
                for key in ("exp_avg", "momentum_buffer")
                if isinstance(buf := state.get(key), torch.Tensor)
            ]
            if not self.scaler.is_enabled()
            else []
        )
        if momentum:
            torch._foreach_mul_(momentum, finite.to(momentum[0].dtype))
        self.run = (self.run + 1) * (~finite).long()
        self.longest = torch.maximum(self.longest, self.run)
        self.total += (self.run > self.tolerated).long()

    def check(self, iter_num: int) -> None:
        """At a log interval (one host sync): count the steps whose gradient was not
        finite since the last read, and raise :class:`TrainingDiverged` if
        ``max_nonfinite_steps`` came in a row (beyond the tolerated streak)."""
        run, longest, total = torch.stack((self.run, self.longest, self.total)).tolist()
        self.longest = self.run.clone()
        new = total - self.seen
        if not new:
            return
        self.seen = total
        tolerated = (
            f", not counting the first {self.tolerated} in a row (the float16 loss scaler's)"
            if self.tolerated
            else ""
        )
        if self.announce:
            metrics.NONFINITE_STEPS.inc(new)
            log.warning(
                "%d step(s) up to iter %d had a non-finite gradient (NaN or inf) and changed "
                "nothing; %d in a row now, %d at most since the last log line "
                "(max_nonfinite_steps=%d%s)",
                new,
                iter_num,
                run,
                longest,
                self.limit,
                tolerated,
            )
        if self.limit and longest - self.tolerated >= self.limit:
            raise TrainingDiverged(
                f"{longest} steps in a row (up to iter {iter_num}) had a non-finite gradient: "
                f"the model diverged (max_nonfinite_steps={self.limit}{tolerated}). "
                f"{self.kept()}",
                iter_num,
            )

    def blocks_checkpoint(self, iter_num: int, say: bool = True) -> str | None:
        """Why no checkpoint may be written now: "weights" when they are not finite (or
        their norm overflows float32), "gradients" when the last steps' gradients were
        not finite beyond the tolerated streak (they left the weights as they were, but
        the next ones may not); None when it may. One host sync: call it only where a
        checkpoint is due. ``say``: log the reason (on the announcing rank)."""
        params = [p.detach() for p in self.model.parameters()]
        weights_ok = torch.isfinite(total_norm(params)).long()
        run, finite_weights = torch.stack((self.run, weights_ok)).tolist()
        why = "weights" if not finite_weights else "gradients" if run > self.tolerated else None
        if why and say and self.announce:
            log.warning(
                "not checkpointing at iter %d: %s; trying again after each step",
                iter_num,
                "the weights are not finite (or their norm overflows float32)"
                if why == "weights"
                else f"the last {run} step(s) had a non-finite gradient",
            )
        return why

    def check_final_weights(self, iter_num: int) -> None:
        """Before the run's last checkpoint, which cannot wait for a streak to end:
        non-finite steps left the weights as they were, so only weights that are
        themselves not finite stop it (:class:`TrainingDiverged`)."""
        if self.blocks_checkpoint(iter_num, say=False) == "weights":
            raise TrainingDiverged(
                f"training ended (iter {iter_num}) with weights that are not finite (or "
                f"whose norm overflows float32): the model diverged. {self.kept()}",
                iter_num,
            )

    def checkpointed(self, iter_num: int) -> None:
        """A checkpoint of ``iter_num`` is on disk."""
        self.checkpointed_iter = iter_num

    def kept(self) -> str:
        """What the trainer leaves on disk when it stops for divergence."""
        if self.checkpointed_iter is None:
            return "Stopping; no checkpoint was written. Start again with " + RESTART_ADVICE
        return (
            f"Stopping without checkpointing this state; {self.ckpt_path} holds the last one "
            f"written, at iter {self.checkpointed_iter}. Resume from it (--init_from=resume) "
            "with " + RESTART_ADVICE
        )
