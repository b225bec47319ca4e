"""The training loop, nanoGPT style: one process per rank (torchrun or alone),
batches from the Redis stream, AdamW with warmup + cosine decay, gradient
accumulation, autocast, evaluation on the fixed validation set, stage control,
atomic checkpoints and resume.

When is an entry acked? With ``ack_policy=step``, once every rank has finished
the optimizer step that used it. Rather than a barrier per step, the acks of
step N are sent after the gradient all-reduce of step N+1: no rank can be in
step N+1's backward before it has finished step N. With
``ack_policy=checkpoint``, entries are acked only after the next checkpoint is
on disk, so a crash never loses a batch the saved model has not seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from services.trainer import metrics
from services.trainer.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    unwrapped_state_dict,
)
from services.trainer.feed import MicroBatch, StreamFeed, to_host_tensor
from services.trainer.model import MaskedLM, ModelConfig
from shared.codec import Batch
from shared.contract import check_meta, read_meta, schema_of
from shared.metrics import serve as serve_metrics
from shared.reader import BatchReader, read_validation, validation_ready
from shared.settings import Settings
from shared.streams import StreamKeys, connect, pending_count, publish_active_stage

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s, for MFU when peak_flops is not set.
KNOWN_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_setting: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; alone, this is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world)
    if device_setting == "auto":
        device_setting = "cuda" if torch.cuda.is_available() else "cpu"
    if device_setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but torch sees no GPU; use --device=cpu")
        index = d.local_rank if d.enabled else (torch.device(device_setting).index or 0)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if d.enabled:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


@dataclass
class StageState:
    """Plateau-driven stage control (``use_all_stages_for_training=false``)."""

    active: int = 0
    best: float = math.inf
    stale: int = 0

    def update(self, val_loss: float, patience: int | None, n_stages: int) -> bool:
        """Record one evaluation; True when the stage advanced."""
        if val_loss < self.best:
            self.best, self.stale = val_loss, 0
            return False
        self.stale += 1
        if patience is not None and self.stale >= patience and self.active + 1 < n_stages:
            self.active, self.best, self.stale = self.active + 1, math.inf, 0
            return True
        return False


@dataclass
class Progress:
    iter_num: int = 0
    tokens: int = 0
    best_val_loss: float = math.inf
    history: list[dict[str, Any]] = field(default_factory=list)


def learning_rate(it: int, s: Settings) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if it < s.warmup_iters:
        return s.learning_rate * (it + 1) / (s.warmup_iters + 1)
    if it >= s.lr_decay_iters:
        return s.min_lr
    ratio = (it - s.warmup_iters) / max(1, s.lr_decay_iters - s.warmup_iters)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.learning_rate - s.min_lr)


class Trainer:
    def __init__(self, settings: Settings, stop: threading.Event) -> None:
        self.s, self.stop = settings, stop
        self.d, self.device = init_distributed(settings.device)
        torch.manual_seed(settings.seed + self.d.rank)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.keys = StreamKeys(settings.namespace)
        password = settings.redis_password.get_secret_value() if settings.redis_password else None
        self.client = connect(settings.redis_url, password, block_s=1.0)
        self.meta = self._wait_for_meta()
        self.fingerprint = self.meta["fingerprint"]
        self.schema = schema_of(self.meta)
        self.ignore_value = int(self.meta["label_ignore_value"])
        self.tokens_per_micro = int(self.meta["batch_size"]) * int(self.meta["block_size"])
        self.n_stages = len(self.meta["stages"]["train"])
        self.val_stages = self.meta["stages"]["val"]

        self.amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            settings.dtype
        ]
        if self.device.type == "cpu":
            self.amp_dtype = None  # the CPU trains in float32
        self.ckpt_path = checkpoint_path(settings.out_dir)
        resume = load_checkpoint(self.ckpt_path) if settings.init_from == "resume" else None
        if resume is not None:
            self._check_resume(resume)

        config = ModelConfig.from_settings(settings, vocab_size=int(self.meta["vocab_size"]))
        config.block_size = int(self.meta["block_size"])
        self.model_config = config
        model = MaskedLM(config).to(self.device)
        if resume is not None:
            model.load_state_dict(resume["model"])
        self.raw_model = model
        self.optimizer = model.configure_optimizer(
            settings.weight_decay,
            settings.learning_rate,
            (settings.beta1, settings.beta2),
            self.device.type,
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scaler.load_state_dict(resume["scaler"])
        if settings.compile:
            model = torch.compile(model)
        if self.d.enabled:
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.model = model

        self.progress = Progress()
        self.stage = StageState()
        if resume is not None:
            self.progress = Progress(
                resume["iter_num"], resume["tokens"], resume["best_val_loss"], resume["history"]
            )
            self.stage = StageState(**resume["stage"])
        self.peak_flops = settings.peak_flops or self._known_peak_flops()

        reader = BatchReader(
            self.client,
            self.keys,
            settings.run_name,
            f"rank{self.d.rank}",
            fingerprint=self.fingerprint,
            schema=self.schema,
            max_bytes=settings.max_message_bytes,
            dead_letter_maxlen=settings.dead_letter_maxlen,
        )
        ack_log = settings.ack_log
        self.feed = StreamFeed(
            reader,
            prefetch=settings.prefetch_batches,
            reclaim_idle_ms=settings.reclaim_idle_ms,
            pin_memory=self.device.type == "cuda",
            ack_log=ack_log.with_suffix(f".rank{self.d.rank}") if ack_log else None,
        )
        self.val_batches = self._load_validation()
        self.rank_label = str(self.d.rank)
        self._queue_observed = 0.0
        self.unacked_prev: list[bytes] = []  # step N-1, acked after step N's all-reduce
        self.held: list[bytes] = []  # ack_policy=checkpoint: everything since the last one
        self.wandb = self._init_wandb()
        if self.d.master:
            log.info(
                "model: %.2fM parameters (%.2fM without embeddings), %d layers, %d heads, "
                "%d wide, vocab %d; world %d on %s, autocast %s; %d tokens/step",
                self.raw_model.num_params(False) / 1e6,
                self.raw_model.num_params() / 1e6,
                config.n_layer,
                config.n_head,
                config.n_embd,
                config.vocab_size,
                self.d.world,
                self.device,
                self.amp_dtype,
                self.tokens_per_step,
            )

    # ------------------------------------------------------------- setup

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_micro * self.s.gradient_accumulation_steps * self.d.world

    def _wait_for_meta(self) -> dict[str, Any]:
        """The dataset contract; the trainer never writes it, producers do."""
        announced = False
        while not self.stop.is_set():
            meta = read_meta(self.client, self.keys)
            if meta is not None and validation_ready(self.client, self.keys, meta["fingerprint"]):
                return meta
            if not announced:
                log.info(
                    "waiting for producers to publish %s and the validation set", self.keys.meta
                )
                announced = True
            self.stop.wait(0.5)
        raise SystemExit(0)

    def _check_resume(self, ckpt: dict[str, Any]) -> None:
        if ckpt["fingerprint"] != self.fingerprint:
            check_meta(self.keys, self.meta, {**ckpt["meta"], "fingerprint": ckpt["fingerprint"]})

    def _known_peak_flops(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        name = torch.cuda.get_device_name(self.device)
        return next((flops for key, flops in KNOWN_PEAK_FLOPS.items() if key in name), 0.0)

    def _load_validation(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        batches: list[Batch] = read_validation(
            self.client,
            self.keys,
            fingerprint=self.fingerprint,
            schema=self.schema,
            max_bytes=self.s.max_message_bytes,
        )
        limit = min(len(batches), self.s.eval_iters)
        return [
            (
                b.stage,
                to_host_tensor(b.tensors["input"], False),
                to_host_tensor(b.tensors["labels"], False),
            )
            for b in batches[:limit]
        ]

    def _init_wandb(self) -> Any:
        if not (self.s.wandb_log and self.d.master):
            return None
        import wandb  # optional; only imported when asked for

        return wandb.init(
            project=self.s.wandb_project, name=self.s.run_name, config=self.s.public_dict()
        )

    # -------------------------------------------------------------- steps

    def _to_device(
        self, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = inputs.to(self.device, non_blocking=True).long()
        y = labels.to(self.device, non_blocking=True).long()
        y = torch.where(y == self.ignore_value, torch.full_like(y, self.s.ignore_index), y)
        return x, y

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> float | None:
        """One optimizer step over gradient_accumulation_steps micro-batches;
        None if stopped while waiting for data."""
        accum = self.s.gradient_accumulation_steps
        used: list[MicroBatch] = []
        total = torch.zeros((), device=self.device)  # summed on the device: no sync per micro-step
        started, waited = time.perf_counter(), self.feed.wait_s
        for micro in range(accum):
            # Under DDP a rank must not leave a step its peers are in: it waits
            # for data, and stopping is agreed on between steps (should_stop).
            mb = self.feed.next(None if self.d.enabled else self.stop)
            if mb is None:
                return None
            used.append(mb)
            x, y = self._to_device(mb.inputs, mb.labels)
            sync = micro == accum - 1
            ctx = self.model.no_sync() if self.d.enabled and not sync else contextlib.nullcontext()
            with ctx, self._autocast():
                _, loss = self.model(x, y, ignore_index=self.s.ignore_index)
                loss = loss / accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        # The all-reduce of this step is done: every rank finished the last step.
        if self.s.ack_policy == "step":
            self.feed.ack(self.unacked_prev)
            self.unacked_prev = []
        if self.s.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        rank = self.rank_label
        metrics.STEP_SECONDS.labels(rank).observe(time.perf_counter() - started)
        metrics.DATA_WAIT_SECONDS.labels(rank).observe(self.feed.wait_s - waited)
        for mb in used:
            metrics.CONSUMED_BATCHES.labels(rank, str(mb.stage)).inc()
            metrics.CONSUMED_BYTES.labels(rank).inc(mb.inputs.nbytes + mb.labels.nbytes)
        metrics.CONSUMED_TOKENS.labels(rank).inc(len(used) * self.tokens_per_micro)
        ids = [mb.entry_id for mb in used]
        if self.s.ack_policy == "step":
            if self.d.enabled:
                self.unacked_prev = ids
            else:
                self.feed.ack(ids)  # alone, this step is already complete everywhere
        else:
            self.held.extend(ids)
        return total.item()

    def _observe_queue(self, every_s: float = 2.0) -> None:
        """Queue gauges from Redis itself (first rank only, every few seconds):
        right whatever the number of producers, zero included."""
        now = time.monotonic()
        if now - self._queue_observed < every_s:
            return
        self._queue_observed = now
        length = self.client.xlen(self.keys.train)
        pending = pending_count(self.client, self.keys.train, self.s.run_name)
        metrics.STREAM_LENGTH.labels(self.keys.train).set(length)
        metrics.GROUP_PENDING.labels(self.keys.train, self.s.run_name).set(pending)
        metrics.GROUP_LAG.labels(self.keys.train, self.s.run_name).set(max(0, length - pending))

    def should_stop(self) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer)."""
        if not self.d.enabled:
            return self.stop.is_set()
        flag = torch.tensor([float(self.stop.is_set())], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _barrier_and_ack(self) -> None:
        """Every rank is past its last step: ack what is still outstanding."""
        if self.d.enabled:
            dist.barrier()
        self.feed.ack(self.unacked_prev + self.held)
        self.unacked_prev, self.held = [], []

    # --------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> tuple[float, dict[int, float]]:
        """Token-weighted loss on the fixed validation set, overall and per
        validation stage; ranks split the batches and sum their results."""
        self.model.eval()
        n = len(self.val_stages)
        sums = torch.zeros(n, dtype=torch.float64, device=self.device)
        counts = torch.zeros(n, dtype=torch.float64, device=self.device)
        for i, (stage, inputs, labels) in enumerate(self.val_batches):
            if i % self.d.world != self.d.rank:
                continue
            x, y = self._to_device(inputs, labels)
            with self._autocast():
                logits, _ = self.raw_model(x)
            ce = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),
                y.view(-1),
                ignore_index=self.s.ignore_index,
                reduction="sum",
            )
            sums[stage] += ce.double()
            counts[stage] += (y != self.s.ignore_index).sum().double()
        if self.d.enabled:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        self.model.train()
        per_stage = {k: (sums[k] / counts[k]).item() for k in range(n) if counts[k] > 0}
        return (sums.sum() / counts.sum().clamp(min=1)).item(), per_stage

    # -------------------------------------------------------- checkpoints

    def checkpoint(self) -> None:
        if self.d.master:
            state = {
                "model": unwrapped_state_dict(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "model_config": asdict(self.model_config),
                "iter_num": self.progress.iter_num,
                "tokens": self.progress.tokens,
                "best_val_loss": self.progress.best_val_loss,
                "history": self.progress.history,
                "stage": asdict(self.stage),
                "itos": self.meta["itos"],
                "mask_token_id": self.meta["mask_token_id"],
                "fingerprint": self.fingerprint,
                "meta": json.loads(json.dumps(self.meta)),
                "stream": {
                    "namespace": self.s.namespace,
                    "group": self.s.run_name,
                    "world": self.d.world,
                    "ack_policy": self.s.ack_policy,
                },
                "settings": self.s.public_dict(),
            }
            save_checkpoint(self.ckpt_path, state)
            log.info("checkpoint at iter %d: %s", self.progress.iter_num, self.ckpt_path)
        # After the barrier inside, every rank knows the checkpoint is durable.
        self._barrier_and_ack()

    # --------------------------------------------------------------- loop

    def run(self) -> dict[str, Any]:
        s, p = self.s, self.progress
        self.feed.start()
        if self.d.local_rank == 0:
            serve_metrics(s.trainer_metrics_port)
        if self.d.master:
            metrics.WORLD_SIZE.set(self.d.world)
            metrics.MAX_BACKLOG.set(s.max_backlog)
            metrics.ACTIVE_STAGE.set(-1 if s.use_all_stages_for_training else self.stage.active)
        if not s.use_all_stages_for_training and self.d.master:
            publish_active_stage(self.client, self.keys, self.stage.active)
        t_last, wait_last, steps_since = time.perf_counter(), self.feed.wait_s, 0
        val_loss = math.nan
        stopped_early = False
        checkpointed_at = -1
        while p.iter_num < s.max_iters:
            lr = learning_rate(p.iter_num, s)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self.train_step()
            if loss is None:
                stopped_early = True
                break
            if self.d.master:
                metrics.LOSS.set(loss)
                metrics.LEARNING_RATE.set(lr)
                metrics.ITERATION.set(p.iter_num + 1)
                self._observe_queue()
            p.iter_num += 1
            p.tokens += self.tokens_per_step
            steps_since += 1
            if p.iter_num % s.log_interval == 0 and self.d.master:
                now = time.perf_counter()
                elapsed = now - t_last
                wait = self.feed.wait_s - wait_last
                tok_s = steps_since * self.tokens_per_step / elapsed
                mfu = (
                    self.raw_model.estimate_mfu(tok_s, self.peak_flops) if self.peak_flops else None
                )
                log.info(
                    "[%3.0f%%] iter %d/%d: loss %.4f, lr %.2e, %.1f ms/step, %.0f tokens/s, "
                    "data wait %.1f%%%s, stage %s",
                    100.0 * p.iter_num / s.max_iters,
                    p.iter_num,
                    s.max_iters,
                    loss,
                    lr,
                    1000 * elapsed / steps_since,
                    tok_s,
                    100 * wait / elapsed,
                    f", mfu {100 * mfu:.1f}%" if mfu is not None else "",
                    "all" if s.use_all_stages_for_training else self.stage.active,
                )
                metrics.TOKENS_PER_SECOND.set(tok_s)
                if mfu is not None:
                    metrics.MFU.set(mfu)
                if self.wandb:
                    self.wandb.log({"loss": loss, "lr": lr, "tokens_per_s": tok_s}, step=p.iter_num)
                t_last, wait_last, steps_since = now, self.feed.wait_s, 0
            if p.iter_num % s.eval_interval == 0 or p.iter_num == s.max_iters:
                val_loss = self._evaluate_and_control()
            if s.checkpoint_interval and p.iter_num % s.checkpoint_interval == 0:
                self.checkpoint()
                checkpointed_at = p.iter_num
            if self.should_stop():
                stopped_early = True
                break
        if checkpointed_at != p.iter_num:
            self.checkpoint()
        if math.isnan(val_loss) and not stopped_early:
            val_loss = self._evaluate_and_control()
        return {
            "iter_num": p.iter_num,
            "val_loss": val_loss,
            "acked": self.feed.acked,
            "double_acks": self.feed.double_acks,
            "dead_letters": self.feed.dead_letters,
            "reclaimed": self.feed.reclaimed,
        }

    def _evaluate_and_control(self) -> float:
        val_loss, per_stage = self.evaluate()
        p = self.progress
        p.best_val_loss = min(p.best_val_loss, val_loss)
        p.history.append({"iter": p.iter_num, "val_loss": val_loss, "stage": self.stage.active})
        if self.d.master:
            metrics.VAL_LOSS.labels("all").set(val_loss)
            for stage, value in per_stage.items():
                metrics.VAL_LOSS.labels(str(stage)).set(value)
            stages = " ".join(f"{k}:{v:.3f}" for k, v in sorted(per_stage.items()))
            log.info("iter %d: val loss %.4f (per stage %s)", p.iter_num, val_loss, stages)
            if self.wandb:
                self.wandb.log({"val_loss": val_loss}, step=p.iter_num)
        if not self.s.use_all_stages_for_training:
            # Patience comes from the contract: the stages the producers make.
            patience = self.meta["stages"]["train"][self.stage.active].get("val_loss_stale_count")
            # Every rank updates its stage state; the first one publishes it.
            if self.stage.update(val_loss, patience, self.n_stages) and self.d.master:
                publish_active_stage(self.client, self.keys, self.stage.active)
                metrics.ACTIVE_STAGE.set(self.stage.active)
                log.info("validation loss plateaued: advancing to stage %d", self.stage.active)
        return val_loss

    def close(self) -> None:
        self.feed.close()
        if self.wandb:
            self.wandb.finish()
        if self.d.enabled:
            dist.destroy_process_group()
