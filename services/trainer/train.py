"""The training loop, nanoGPT style: one process per rank (torchrun or alone),
batches from the Redis stream, AdamW with warmup + cosine decay, gradient
accumulation, autocast, evaluation on the fixed validation set, stage control,
atomic checkpoints and resume.

When is an entry acked? With ``ack_policy=step``, once every rank has finished
the optimizer step that used it. Rather than a barrier per step, the acks of
step N are sent during step N+1, after the small all-reduce that starts every
step (``_all_ready``): on each rank it runs after that rank's step N on the
device (stream order), and reading its result back waits for it, so once it
returns every rank has finished step N. Do not remove that all-reduce or its
read-back without replacing this guarantee. Alone on a GPU, a step's entries
are acked once the device has run it (a CUDA event, one step later). With
``ack_policy=checkpoint``, entries are acked only after the next checkpoint is
on disk, so a crash never loses a batch the saved model has not seen.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from services.trainer import metrics
from services.trainer.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    checkpoint_path,
    unwrapped_state_dict,
)
from services.trainer.elbo import (
    Bound,
    autoregressive_nll,
    bound_from_sums,
    diffusion_elbo,
    elbo_weighted_loss,
    windows_of,
)
from services.trainer.feed import MicroBatch, StreamFeed, to_host_tensor
from services.trainer.guard import DivergenceGuard
from services.trainer.model import MaskedLM, ModelConfig
from shared.codec import Batch
from shared.contract import ContractMismatch, check_meta, read_meta, schema_of
from shared.faults import PASSING, REFUSED, RedisState, ride_out
from shared.metrics import serve as serve_metrics
from shared.reader import BatchReader, read_validation, validation_ready
from shared.settings import TrainerConfig, TrainSettings
from shared.streams import (
    StreamKeys,
    client_for,
    pending_count,
    publish_active_stage,
)
from shared.validation import EntryValidator

log = logging.getLogger(__name__)

# The loss ignores this target; the wire's label_ignore_value is mapped to it.
IGNORE_INDEX = -100
# The first rank compares the stored contract with its own every 5 queue-gauge rounds (10 s).
CONTRACT_CHECK_ROUNDS = 5
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
            raise TrainerConfigError("device=cuda but torch sees no GPU: use --device=cpu or auto")
        index = d.local_rank if d.enabled else (torch.device(device_setting).index or 0)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        # TF32 for what runs in float32 (sampling, evaluation, Muon's iterations);
        # autocast's bf16 matmuls are unaffected.
        torch.set_float32_matmul_precision("high")
    else:
        device = torch.device("cpu")
    if d.enabled:
        # Ranks wait in a collective while a peer waits for data: allow long
        # starvation (producers down) rather than crashing after the default.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(hours=24),
        )
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


def learning_rate(it: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if it < s.warmup_iters:
        return s.learning_rate * (it + 1) / (s.warmup_iters + 1)
    if it >= s.lr_decay_iters:
        return s.min_lr
    ratio = (it - s.warmup_iters) / max(1, s.lr_decay_iters - s.warmup_iters)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.learning_rate - s.min_lr)


def optimizer_for(model: MaskedLM, s: TrainSettings, device_type: str) -> torch.optim.Optimizer:
    """The optimizer the settings ask for (``optimizer``, rates, decay, betas)."""
    return model.configure_optimizer(
        s.weight_decay,
        s.learning_rate,
        (s.beta1, s.beta2),
        device_type,
        muon_learning_rate=s.muon_learning_rate if s.optimizer == "muon" else None,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, it: int, s: TrainSettings) -> float:
    """Give every group the schedule's rate at ``it`` times its ``lr_scale``
    (Muon's groups run at their own peak); the schedule's rate."""
    lr = learning_rate(it, s)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


def several_machines() -> bool:
    """Whether this rank's run spans several machines (torchrun's environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def least_over_ranks(value: float, device: torch.device) -> float:
    """The smallest of every rank's ``value`` (one all-reduce), read back: so it also waits
    until this rank's earlier work on the device is done (NCCL returns once queued)."""
    flag = torch.tensor([value], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item()


def agree_to_start(device: torch.device, refusing: bool) -> bool:
    """The first collective of every rank, right after joining the process group: whether
    every rank may start (False: some rank refused, see :func:`refuse_with_peers`)."""
    return bool(least_over_ranks(0.0 if refusing else 1.0, device))


def refuse_with_peers(settings: TrainerConfig) -> None:
    """For a rank that refused to start, on one of several machines: join the process group
    and say so at the start's agreement, so that the other machines' ranks stop with exit 2
    at once instead of waiting for this one (torchrun stops only this machine's ranks)."""
    try:
        _, device = init_distributed(settings.device)
    except TrainerConfigError:
        return  # no device to join with: the others wait for the process group's timeout
    except Exception as exc:  # the others went away first, say: this rank's exit code stands
        log.warning("could not tell the other ranks (%s: %s)", type(exc).__name__, exc)
        return
    try:
        agree_to_start(device, refusing=True)
    except Exception as exc:
        log.warning("could not tell the other ranks (%s: %s)", type(exc).__name__, exc)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def wait_for_contract(
    client: redis.Redis,
    keys: StreamKeys,
    stop: threading.Event,
    state: RedisState | None = None,
) -> dict[str, Any] | None:
    """The dataset contract, once producers have published it and the
    validation set (the trainer never writes either); None if stopped first.
    An unreachable Redis is waited out; refused credentials are raised."""
    state = state or RedisState("trainer")
    announced = False
    while not stop.is_set():
        try:
            meta = read_meta(client, keys)
            ready = meta is not None and validation_ready(client, keys, meta["fingerprint"])
        except REFUSED:
            raise
        except PASSING as exc:
            state.failed(exc)
            stop.wait(1.0)
            continue
        state.recovered()
        if meta is not None and ready:
            return meta
        if not announced:
            log.info("waiting for producers to publish %s and the validation set", keys.meta)
            announced = True
        stop.wait(0.5)
    return None


class TrainerConfigError(Exception):
    """Settings that cannot work together with the queue; exit code 2."""


def check_queue_room(settings: TrainerConfig, world: int, max_backlog: int) -> None:
    """Refuse settings under which the trainer would hold more entries than the
    stream may contain: producers would wait for room, ranks for data, forever.

    A rank holds the entries of the steps it has not acked yet (two steps under
    ``ack_policy=step``: the last one and the one in progress; every step since
    the last checkpoint under ``ack_policy=checkpoint``) plus what its read-ahead
    took (up to twice ``prefetch_batches``: a full queue and one read in hand)."""
    s = settings
    if s.ack_policy == "step":
        steps, why = 2, "2 steps (the last one and the one in progress)"
    else:
        steps = s.checkpoint_interval or s.max_iters
        why = f"{steps} steps (checkpoint_interval={s.checkpoint_interval})"
    per_rank = s.gradient_accumulation_steps * steps + 2 * s.prefetch_batches
    needed = world * per_rank
    if needed > max_backlog:
        raise TrainerConfigError(
            f"ack_policy={s.ack_policy} would hold up to {needed} entries, more than "
            f"max_backlog={max_backlog} lets the stream hold: {world} rank(s) x "
            f"({s.gradient_accumulation_steps} micro-batches x {why} + 2 x "
            f"prefetch_batches={s.prefetch_batches}) = {needed}. Producers would wait for "
            "room and the trainer for data, forever. Raise max_backlog (producers' setting), "
            "or lower "
            + (
                "gradient_accumulation_steps or prefetch_batches."
                if s.ack_policy == "step"
                else "checkpoint_interval, gradient_accumulation_steps or prefetch_batches, "
                "or use ack_policy=step."
            )
        )


class StepFailed(RuntimeError):
    """A training step raised; its entries have been charged one failure each."""

    def __init__(self, ids: list[bytes], cause: Exception) -> None:
        shown = ", ".join(i.decode() for i in ids[:8])
        super().__init__(
            f"training step failed on entries {shown} ({type(cause).__name__}: {cause}); "
            "each is dead-lettered after max_deliveries failed steps"
        )


FAIL_ON_ENV = "MASKSTREAM_TEST_FAIL_ON"


def _fail_on() -> set[tuple[int, int]]:
    """Test hook: "producer:seq,..." in MASKSTREAM_TEST_FAIL_ON makes a step
    raise when it uses one of those entries (valid entries a step cannot use)."""
    pairs = set()
    for item in os.environ.get(FAIL_ON_ENV, "").split(","):
        if item.strip():
            producer, _, seq = item.partition(":")
            pairs.add((int(producer), int(seq)))
    return pairs


class Trainer:
    """One rank's training run. Build it with :meth:`start`; the constructor
    takes what start found (process group, Redis client, contract) and reads
    top to bottom as the build steps below."""

    @classmethod
    def start(cls, settings: TrainerConfig, stop: threading.Event) -> Trainer | None:
        """Join the process group, connect to Redis and wait for the contract;
        None when asked to stop before producers published it. Raises
        ``CheckpointError`` or ``ContractMismatch`` when resuming is impossible, Redis's
        refusal, and ``TrainerConfigError`` when another rank refused (every rank stops)."""
        d, device = init_distributed(settings.device)
        if d.enabled and not agree_to_start(device, refusing=False):
            dist.destroy_process_group()
            raise TrainerConfigError(
                "another rank refused to start (its log says why): stopping too"
            )
        client = client_for(settings, block_s=1.0)
        keys = StreamKeys(settings.namespace)
        state = RedisState(f"trainer rank{d.rank}", on_change=metrics.redis_up)
        refused: Exception | None = None
        try:
            meta = wait_for_contract(client, keys, stop, state)
            published = ride_out(lambda: client.get(keys.max_backlog), stop, state)
        except (ContractMismatch, *REFUSED) as exc:  # credentials, a malformed contract
            refused, meta, published = exc, None, None
        if d.enabled:
            # Every rank gives up together, or none does: a rank alone in DDP's first
            # collective would wait for the others forever (-1: a rank was refused, 0: a
            # rank was asked to stop first, 1: every rank has the contract).
            have = least_over_ranks(-1.0 if refused else float(meta is not None), device)
            if have < 0:
                dist.destroy_process_group()
                raise refused or TrainerConfigError(
                    "another rank was refused by Redis or found a malformed contract (its log "
                    "says why): stopping too"
                )
            if not have:
                meta = None
        if refused is not None:
            raise refused
        if meta is None:
            if d.enabled:
                dist.destroy_process_group()
            return None
        # The producers' bound, as they published it (else this trainer's setting).
        try:
            max_backlog = int(published) if published is not None else settings.max_backlog
        except ValueError:
            log.warning("ignoring %s = %r: not an integer", keys.max_backlog, published)
            max_backlog = settings.max_backlog
        try:
            check_queue_room(settings, d.world, max_backlog)
            trainer = cls(
                settings, stop, meta, client=client, dist_info=d, device=device, redis_state=state
            )
        except BaseException:
            # Leave the process group, or the process aborts at exit ("terminate called
            # without an active exception"). Ranks refuse alike where they agree first (the
            # resume); any other failure here stops this rank alone, and torchrun the rest of
            # its machine (other machines' ranks wait in DDP's first collective).
            if d.enabled:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
            raise
        trainer.max_backlog = max_backlog
        return trainer

    def __init__(
        self,
        settings: TrainerConfig,
        stop: threading.Event,
        meta: dict[str, Any],
        *,
        client: redis.Redis,
        dist_info: Dist,
        device: torch.device,
        redis_state: RedisState | None = None,
    ) -> None:
        self.s, self.stop, self.client = settings, stop, client
        self.d, self.device = dist_info, device
        self.redis = redis_state or RedisState(
            f"trainer rank{dist_info.rank}", on_change=metrics.redis_up
        )
        self.keys = StreamKeys(settings.namespace)
        torch.manual_seed(settings.seed + self.d.rank)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self._adopt_contract(meta)
        self.ckpt_path = checkpoint_path(settings.out_dir)
        resume = self._agree_on_resume()
        try:
            self._build_model(resume)
            self._build_optimizer(resume)
            self._restore_progress(resume)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            if resume is None:
                raise
            # A checkpoint that loads but does not fit (edited, or of another trainer version).
            raise CheckpointError(
                f"checkpoint {self.ckpt_path} cannot be resumed: {type(exc).__name__}: {exc}"
            ) from exc
        self._build_feed()
        self.val_batches = self._load_validation()
        # The original windows of the validation batches, for the likelihood bound.
        self.val_windows = (
            torch.cat([windows_of(x, y, self.ignore_value) for _, x, y in self.val_batches])
            if self.val_batches
            else torch.zeros((0, int(meta["block_size"])), dtype=torch.long)
        )
        self.last_bound: Bound | None = None
        self.rank_label = str(self.d.rank)
        # Each stage's series from the start, at 0: a rank that never trains a step still
        # reports "nothing consumed" (the TrainerStalled alert), not "no series".
        for stage in range(self.n_stages):
            metrics.CONSUMED_BATCHES.labels(self.rank_label, str(stage))
        self.max_backlog = settings.max_backlog  # start() puts the producers' published bound
        self._fail_on = _fail_on()
        self._gauges_stop = threading.Event()
        self._contract_differs = False  # Redis holds another contract (logged once)
        # Step N-1's entries: acked after step N's all-reduce (several ranks), or
        # once the device has run step N-1 (one GPU: _previous_step, its end).
        self.unacked_prev: list[bytes] = []
        self.guard = DivergenceGuard(
            self.model,
            self.optimizer,
            self.scaler,
            grad_clip=settings.grad_clip,
            max_nonfinite_steps=settings.max_nonfinite_steps,
            ckpt_path=self.ckpt_path,
            checkpointed_iter=(
                self.progress.iter_num
                if self.ckpt_path.exists() and self.progress.iter_num
                else None
            ),
            announce=self.d.master,
        )
        # A checkpoint that came due during a streak: written after the first step out of it.
        self._checkpoint_pending = False
        self._previous_step: torch.cuda.Event | None = None
        self.held: list[bytes] = []  # ack_policy=checkpoint: everything since the last one
        self.wandb = self._init_wandb()
        if self.d.master:
            self._log_model()

    # ------------------------------------------------------------- setup

    def _adopt_contract(self, meta: dict[str, Any]) -> None:
        """What the trainer takes from the producers' contract."""
        self.meta = meta
        self.fingerprint = meta["fingerprint"]
        self.schema = schema_of(meta)
        self.ignore_value = int(meta["label_ignore_value"])
        self.tokens_per_micro = int(meta["batch_size"]) * int(meta["block_size"])
        self.n_stages = len(meta["stages"]["train"])
        self.val_stages = meta["stages"]["val"]
        # Producers decide whether batches follow the active stage; the
        # trainer's plateau control only matters when they do.
        self.all_stages = bool(meta["use_all_stages_for_training"])
        self.mask_id = int(meta["mask_token_id"])
        # Stages whose batches the ELBO weighting applies to (t is their drawn ratio).
        self.uniform_stages = {
            i for i, stage in enumerate(meta["stages"]["train"]) if stage.get("type") == "uniform"
        }

    def _load_resume(self) -> Checkpoint | None:
        if self.s.init_from != "resume":
            return None
        checkpoint = Checkpoint.load(self.ckpt_path)
        checkpoint.check_contract(self.keys, self.meta)
        return checkpoint

    def _agree_on_resume(self) -> Checkpoint | None:
        """Load the checkpoint to resume from, and make sure every rank resumes from the same
        one (iteration and weights), or every rank starts from scratch: each reads ``out_dir``
        itself, so on several machines it must be one shared directory. Every rank takes the
        same decision (one small all-reduce): a rank that stopped alone would leave its peers
        waiting in DDP's first collective."""
        failure: Exception | None = None
        digest = -1
        try:
            resume = self._load_resume()
            if resume is not None:
                digest = resume.weights_digest()
        except (CheckpointError, ContractMismatch) as exc:
            failure, resume = exc, None
        except Exception as exc:  # weights that cannot be hashed: not a checkpoint we resume
            failure = CheckpointError(f"checkpoint {self.ckpt_path} cannot be resumed: {exc}")
            resume = None
        if not self.d.enabled:
            if failure is not None:
                raise failure
            return resume
        # Every value and its negation under one MAX: the largest and the smallest.
        it = -1 if resume is None else resume.iter_num
        values = [int(failure is not None), it, -it, digest, -digest]
        found = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        failed, newest, oldest, digest_max, digest_min = found.tolist()
        oldest, digest_min = -oldest, -digest_min
        shared = (
            f"every rank reads out_dir ({self.s.out_dir} here) itself, so on several machines "
            "it must be one shared directory"
        )
        if failure is not None:
            raise failure
        if failed:
            raise CheckpointError(
                f"another rank could not resume from its checkpoint (its log says why); {shared}"
            )
        if oldest == -1 and newest != -1:
            raise TrainerConfigError(
                f"some ranks start from scratch and others resume from iteration {newest}: "
                f"give every rank the same init_from; {shared}"
            )
        if newest != oldest or digest_max != digest_min:
            raise TrainerConfigError(
                "the ranks found different checkpoints in out_dir (iterations "
                f"{oldest} to {newest}, or other weights): {shared}"
            )
        return resume

    def _build_model(self, resume: Checkpoint | None) -> None:
        self.amp_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            self.s.dtype
        ]
        if self.device.type == "cpu":
            self.amp_dtype = None  # the CPU trains in float32
        self.model_config = ModelConfig.from_settings(
            self.s, vocab_size=int(self.meta["vocab_size"]), block_size=int(self.meta["block_size"])
        )
        if resume is not None:
            shape = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "causal")
            ours = {k: getattr(self.model_config, k) for k in shape}
            theirs = {k: getattr(resume.model_config, k) for k in shape}
            if ours != theirs:
                raise CheckpointError(
                    f"checkpoint {self.ckpt_path} holds a model of shape {theirs}, the settings "
                    f"ask for {ours}: resume with the run's model settings, or "
                    "--init_from=scratch"
                )
            self.raw_model = resume.build_model(self.device)
        else:
            self.raw_model = MaskedLM(self.model_config).to(self.device)
        model: torch.nn.Module = self.raw_model
        if self.d.enabled:
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.s.compile:
            # Compiling the DDP module, not wrapping a compiled one: dynamo then splits the
            # graph at DDP's bucket boundaries, so gradients are reduced while backward runs.
            model = torch.compile(model)
        self.model = model
        self.peak_flops = self.s.peak_flops or self._known_peak_flops()

    def _build_optimizer(self, resume: Checkpoint | None) -> None:
        s = self.s
        self.optimizer = optimizer_for(self.raw_model, s, self.device.type)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )
        if resume is not None and resume.optimizer is not None:
            theirs = resume.settings.get("optimizer", "adamw")  # older checkpoints: AdamW
            if theirs != s.optimizer:
                raise CheckpointError(
                    f"checkpoint {self.ckpt_path} was trained with optimizer={theirs}, the "
                    f"settings ask for optimizer={s.optimizer}: resume with --optimizer={theirs}, "
                    "or --init_from=scratch"
                )
            scales = [group["lr_scale"] for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(resume.optimizer)
            # Loading restores the saved groups' options: keep this run's rates
            # (and give checkpoints older than lr_scale one).
            for group, scale in zip(self.optimizer.param_groups, scales, strict=True):
                group["lr_scale"] = scale
            if resume.scaler is not None:
                self.scaler.load_state_dict(resume.scaler)

    def _restore_progress(self, resume: Checkpoint | None) -> None:
        self.progress, self.stage = Progress(), StageState()
        if resume is not None:
            self.progress = Progress(
                resume.iter_num, resume.tokens, resume.best_val_loss, resume.history
            )
            self.stage = StageState(**resume.stage)
            log.info(
                "resumed from %s at iter %d (%d tokens)",
                self.ckpt_path,
                resume.iter_num,
                resume.tokens,
            )

    def _build_feed(self) -> None:
        s = self.s
        reader = BatchReader(
            self.client,
            self.keys,
            s.run_name,
            f"rank{self.d.rank}",
            validator=EntryValidator(self.meta, "train", s.max_message_bytes),
            dead_letter_maxlen=s.dead_letter_maxlen,
            max_deliveries=s.max_deliveries,
        )
        self.feed = StreamFeed(
            reader,
            prefetch=s.prefetch_batches,
            reclaim_idle_ms=s.reclaim_idle_ms,
            pin_memory=self.device.type == "cuda",
            ack_log=s.ack_log.with_name(f"{s.ack_log.name}.rank{self.d.rank}")
            if s.ack_log
            else None,
            world=self.d.world,
            stop=self.stop,
            redis_state=self.redis,
        )

    def _log_model(self) -> None:
        config = self.model_config
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

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_micro * self.s.gradient_accumulation_steps * self.d.world

    def _known_peak_flops(self) -> float:
        if self.device.type != "cuda":
            return 0.0
        name = torch.cuda.get_device_name(self.device)
        return next((flops for key, flops in KNOWN_PEAK_FLOPS.items() if key in name), 0.0)

    def _load_validation(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        batches: list[Batch] = (
            ride_out(
                lambda: read_validation(
                    self.client,
                    self.keys,
                    EntryValidator(self.meta, "val", self.s.max_message_bytes),
                    on_bad=lambda reason: metrics.VALIDATION_SKIPPED.labels(reason).inc(),
                ),
                self.stop,
                self.redis,
            )
            or []
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
        y = torch.where(y == self.ignore_value, torch.full_like(y, IGNORE_INDEX), y)
        return x, y

    def _loss(self, mb: MicroBatch) -> torch.Tensor:
        """The step's objective on one micro-batch.

        ``objective=ar``: next-character cross-entropy on the original windows
        (rebuilt from the batch as the wire format documents), causal model.
        ``objective=diffusion``: cross-entropy on the selected positions; for
        batches that carry ``mask_ratio`` with ``loss_weighting=elbo``, each
        row's sum divided by t·L (the ELBO's weighting), averaged over rows."""
        if self.s.objective == "ar":
            # Copied from the pinned host tensors, rebuilt on the device.
            original = windows_of(
                mb.inputs.to(self.device, non_blocking=True),
                mb.labels.to(self.device, non_blocking=True),
                self.ignore_value,
            )
            _, loss = self.model(original[:, :-1], original[:, 1:])
            return loss
        x, y = self._to_device(mb.inputs, mb.labels)
        if (
            self.s.loss_weighting == "elbo"
            and mb.mask_ratio is not None
            and mb.stage in self.uniform_stages
        ):
            t = mb.mask_ratio.to(self.device, non_blocking=True)
            logits, _ = self.model(x)
            return elbo_weighted_loss(logits, y, t, IGNORE_INDEX)
        _, loss = self.model(x, y, ignore_index=IGNORE_INDEX)
        return loss

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> torch.Tensor | None:
        """One optimizer step over gradient_accumulation_steps micro-batches;
        its loss (a tensor on the device: reading it waits for the step), or
        None if stopped while waiting for data. Alone on a GPU, it returns once
        the device has run the previous step: the host queues step N+1 while the
        device runs step N. (With several ranks the all-reduce that starts each
        step waits for the last one: the ack rule in the module's docstring.)"""
        accum = self.s.gradient_accumulation_steps
        used: list[MicroBatch] = []
        total = torch.zeros((), device=self.device)  # summed on the device: no sync per micro-step
        started, waited = time.perf_counter(), self.feed.wait_s
        # Every micro-batch of the step first, then agree: a rank that was asked
        # to stop while waiting for data tells its peers before any of them
        # enters the step's collectives. Entries fetched for a step that does
        # not run stay pending and are delivered again after a restart.
        fetched = []
        while len(fetched) < accum:
            mb = self.feed.next(self.stop)
            if mb is None:
                break
            fetched.append(mb)
        if not self._all_ready(len(fetched) == accum):
            return None
        for micro, mb in enumerate(fetched):
            used.append(mb)
            try:
                if (mb.producer, mb.seq) in self._fail_on:
                    raise RuntimeError(f"{FAIL_ON_ENV} names producer {mb.producer} seq {mb.seq}")
                sync = micro == accum - 1
                no_sync = self.d.enabled and not sync
                ctx = self.model.no_sync() if no_sync else contextlib.nullcontext()
                with ctx, self._autocast():
                    loss = self._loss(mb) / accum
                self.scaler.scale(loss).backward()
                total += loss.detach()
            except Exception as exc:
                # Count the failure against every entry of this step: after
                # max_deliveries of them a restart dead-letters the entry.
                ids = [m.entry_id for m in used]
                self.feed.record_failure(ids)
                metrics.STEP_FAILURES.labels(self.rank_label).inc()
                raise StepFailed(ids, exc) from exc
        # The all-reduce of this step is done: every rank finished the last step.
        if self.s.ack_policy == "step":
            self.feed.ack(self.unacked_prev)
            self.unacked_prev = []
        self.guard.step()
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
            elif self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
                self._ack_after_previous_step(ids, done)
            else:
                self.feed.ack(ids)  # alone on the CPU, the step has run everywhere
        else:
            self.held.extend(ids)
        return total

    def _ack_after_previous_step(self, ids: list[bytes], done: torch.cuda.Event) -> None:
        """Alone on a GPU, with this step queued (``done``: recorded after it):
        wait until the device has run the previous one, then ack its entries.
        The host runs one step ahead of the device, no more, and an entry is
        acked once its step has run."""
        if self._previous_step is not None:
            self._previous_step.synchronize()
            self.feed.ack(self.unacked_prev)
        self._previous_step, self.unacked_prev = done, ids

    def _observe_queue(self, every_s: float = 2.0) -> None:
        """Queue gauges from Redis itself (first rank only, every few seconds, in
        a thread of their own: a frozen Redis must not hold up the steps): right
        whatever the number of producers, zero included."""
        failing = False
        rounds = 0
        while not self._gauges_stop.wait(every_s):
            if rounds % CONTRACT_CHECK_ROUNDS == 0:
                self._check_stored_contract()
            rounds += 1
            try:
                length = self.client.xlen(self.keys.train)
                pending = pending_count(self.client, self.keys.train, self.s.run_name)
            except PASSING as exc:  # only gauges: try again next time
                self.redis.failed(exc)
                continue
            except Exception as exc:  # a refusal, say: the feed stops the trainer for it
                if not failing:
                    log.warning("queue gauges: %s: %s", type(exc).__name__, exc)
                failing = True
                continue
            failing = False
            self._set_queue_gauges(length, pending)

    def _check_stored_contract(self) -> None:
        """Say so (once per change) when Redis holds another contract than this run's: its
        producers then stop (exit 3) and this trainer starves. It keeps its GPUs, trains on
        what is queued and dead-letters entries of the other contract."""
        try:
            stored = read_meta(self.client, self.keys)
            if stored is None:  # gone (a restart, a DEL): producers write theirs again
                return
            check_meta(self.keys, stored, self.meta)
        except Exception as exc:  # a report only: the feed handles outages
            if not isinstance(exc, ContractMismatch):
                return  # Redis away, the key of another type, ...: the feed says so
            if not self._contract_differs:
                log.error(
                    "%s; this run's producers refuse it and stop: restore this run's contract "
                    "(DEL %s; its producers write it again when restarted) or stop the other "
                    "run's producers",
                    exc,
                    self.keys.meta,
                )
            self._contract_differs = True
            return
        if self._contract_differs:
            log.info("%s holds this run's contract again", self.keys.meta)
        self._contract_differs = False

    def _set_queue_gauges(self, length: int, pending: int) -> None:
        metrics.STREAM_LENGTH.labels(self.keys.train).set(length)
        metrics.GROUP_PENDING.labels(self.keys.train, self.s.run_name).set(pending)
        metrics.GROUP_LAG.labels(self.keys.train, self.s.run_name).set(max(0, length - pending))

    def _all_ready(self, ready: bool) -> bool:
        """Whether every rank has its step's data and nobody was asked to stop
        (every rank gets the same answer)."""
        if not self.d.enabled:
            return ready
        # The read-back inside is what makes acking step N-1 safe.
        return bool(least_over_ranks(float(ready), self.device))

    def _publish_stage(self) -> None:
        """Tell producers the active stage, waiting out a Redis outage."""
        ride_out(
            lambda: publish_active_stage(self.client, self.keys, self.stage.active),
            self.stop,
            self.redis,
        )

    def _barrier_and_ack(self) -> None:
        """Every rank is past its last step: ack what is still outstanding."""
        if self.d.enabled:
            dist.barrier()
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the last step has run
            self._previous_step = None
        self.feed.ack(self.unacked_prev + self.held)
        self.feed.flush()
        self.unacked_prev, self.held = [], []

    # --------------------------------------------------------- evaluation

    @torch.no_grad()
    def likelihood_bound(self, windows: int) -> Bound:
        """The validation likelihood bound in nats/char over the first
        ``windows`` validation windows (0: all): the diffusion ELBO, or the AR
        baseline's NLL. Ranks split the windows and add their sums; masks
        depend only on the seed, so the figure is the same for any world."""
        every = self.val_windows
        chosen = every if windows <= 0 else every[:windows]
        rows = slice(self.d.rank, None, self.d.world)
        self.raw_model.eval()
        with self._autocast():
            if self.s.objective == "ar":
                values = autoregressive_nll(self.raw_model, chosen, rows=rows)
            else:
                values = diffusion_elbo(
                    self.raw_model,
                    chosen,
                    self.mask_id,
                    nodes=self.s.elbo_nodes,
                    draws=self.s.elbo_draws,
                    seed=self.s.seed,
                    rows=rows,
                )
        self.raw_model.train()
        sums = torch.tensor(
            [values.sum().item(), (values**2).sum().item(), float(values.numel())],
            dtype=torch.float64,
            device=self.device,
        )
        if self.d.enabled:
            dist.all_reduce(sums)
        return bound_from_sums(sums[0].item(), sums[1].item(), int(sums[2].item()))

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
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            sums[stage] += ce.double()
            counts[stage] += (y != IGNORE_INDEX).sum().double()
        if self.d.enabled:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        self.model.train()
        per_stage = {k: (sums[k] / counts[k]).item() for k in range(n) if counts[k] > 0}
        if counts.sum() == 0:  # no usable validation batch: no loss, not a perfect one
            return math.nan, per_stage
        return (sums.sum() / counts.sum()).item(), per_stage

    # -------------------------------------------------------- checkpoints

    def checkpoint(self) -> bool:
        """Write the checkpoint (the first rank) and ack what is outstanding (every rank).
        False when it could not be written (a full disk, say): logged and counted, and under
        ``ack_policy=step`` training goes on (the checkpoint on disk stays the last good one;
        the next interval tries again). Under ``ack_policy=checkpoint`` nothing may be acked
        without a checkpoint, so every rank raises :class:`CheckpointWriteError` instead."""
        written = True
        if self.d.master:
            try:
                self._write_checkpoint()
            except CheckpointWriteError as exc:
                written = False
                metrics.CHECKPOINT_FAILURES.inc()
                log.error("%s", exc)
        # Every rank learns the outcome (one tiny all-reduce), so all go on or stop together
        # and all call the same collectives next (the run's last checkpoint is retried).
        written = self._all_ready(written)
        if written:
            self.guard.checkpointed(self.progress.iter_num)
        if self.s.ack_policy == "checkpoint" and not written:
            raise CheckpointWriteError(
                f"the checkpoint in {self.s.out_dir} could not be written, and under "
                "ack_policy=checkpoint entries are acked only once it is: stopping, the "
                f"{len(self.held) + len(self.unacked_prev)} entries held stay pending and are "
                "delivered again; free space there or choose another --out_dir"
            )
        if not written and self.d.master:
            log.error(
                "training goes on and the next checkpoint tries again (free space in %s or "
                "fix it; the last checkpoint written stays as it was)",
                self.s.out_dir,
            )
        # After the barrier inside, every rank knows the checkpoint is durable.
        self._barrier_and_ack()
        return written

    def _write_checkpoint(self) -> None:
        Checkpoint(
            model=unwrapped_state_dict(self.model),
            model_config=self.model_config,
            itos=list(self.meta["itos"]),
            mask_token_id=int(self.meta["mask_token_id"]),
            fingerprint=self.fingerprint,
            meta=self.meta,
            iter_num=self.progress.iter_num,
            tokens=self.progress.tokens,
            best_val_loss=self.progress.best_val_loss,
            history=self.progress.history,
            stage=asdict(self.stage),
            optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(),
            stream={
                "namespace": self.s.namespace,
                "group": self.s.run_name,
                "world": self.d.world,
                "ack_policy": self.s.ack_policy,
            },
            settings=self.s.public_dict(),
        ).save(self.ckpt_path)
        log.info("checkpoint at iter %d: %s", self.progress.iter_num, self.ckpt_path)

    # --------------------------------------------------------------- loop

    def run(self) -> dict[str, Any]:
        s, p = self.s, self.progress
        self.feed.start()
        if self.d.local_rank == 0:
            serve_metrics(s.trainer_metrics_port, s.metrics_address)
        if self.d.master:
            metrics.WORLD_SIZE.set(self.d.world)
            metrics.MAX_BACKLOG.set(self.max_backlog)
            metrics.ACTIVE_STAGE.set(-1 if self.all_stages else self.stage.active)
        if not self.all_stages and self.d.master:
            self._publish_stage()
        if self.d.master:
            threading.Thread(target=self._observe_queue, name="queue-gauges", daemon=True).start()
        t_last, wait_last, steps_since = time.perf_counter(), self.feed.wait_s, 0
        val_loss = math.nan
        stopped_early = False
        checkpointed_at = -1
        while p.iter_num < s.max_iters:
            lr = set_learning_rate(self.optimizer, p.iter_num, s)
            loss = self.train_step()
            if loss is None:
                stopped_early = True
                break
            if self.d.master:
                metrics.LEARNING_RATE.set(lr)
                metrics.ITERATION.set(p.iter_num + 1)
            p.iter_num += 1
            p.tokens += self.tokens_per_step
            steps_since += 1
            if p.iter_num % s.log_interval == 0:
                self.guard.check(p.iter_num)
            if p.iter_num % s.log_interval == 0 and self.d.master:
                # Read back only here (as nanoGPT does): a read every step would
                # make the host wait for the device before queueing the next step.
                loss_value = loss.item()
                metrics.LOSS.set(loss_value)
                now = time.perf_counter()
                elapsed = now - t_last
                wait = self.feed.wait_s - wait_last
                tok_s = steps_since * self.tokens_per_step / elapsed
                # tok_s counts every rank's tokens: against the peak of every rank's device.
                mfu = (
                    self.raw_model.estimate_mfu(tok_s, self.peak_flops * self.d.world)
                    if self.peak_flops
                    else None
                )
                log.info(
                    "[%3.0f%%] iter %d/%d: loss %.4f, lr %.2e, %.1f ms/step, %.0f tokens/s, "
                    "data wait %.1f%%%s, stage %s",
                    100.0 * p.iter_num / s.max_iters,
                    p.iter_num,
                    s.max_iters,
                    loss_value,
                    lr,
                    1000 * elapsed / steps_since,
                    tok_s,
                    100 * wait / elapsed,
                    f", mfu {100 * mfu:.1f}%" if mfu is not None else "",
                    "all" if self.all_stages else self.stage.active,
                )
                metrics.TOKENS_PER_SECOND.set(tok_s)
                if mfu is not None:
                    metrics.MFU.set(mfu)
                if self.wandb:
                    self.wandb.log(
                        {"loss": loss_value, "lr": lr, "tokens_per_s": tok_s}, step=p.iter_num
                    )
                t_last, wait_last, steps_since = now, self.feed.wait_s, 0
            if p.iter_num % s.eval_interval == 0 or p.iter_num == s.max_iters:
                val_loss = self._evaluate_and_control(final=p.iter_num == s.max_iters)
            due = s.checkpoint_interval and p.iter_num % s.checkpoint_interval == 0
            if due or self._checkpoint_pending:
                # Pending: one host sync per step until the streak is over (rare).
                self._checkpoint_pending = (
                    self.guard.blocks_checkpoint(p.iter_num, say=bool(due)) is not None
                )
                if not self._checkpoint_pending and self.checkpoint():
                    checkpointed_at = p.iter_num
        self.guard.check_final_weights(p.iter_num)
        # The last one is tried again if the last interval's failed.
        written = checkpointed_at == p.iter_num or self.checkpoint()
        if math.isnan(val_loss) and not stopped_early:
            val_loss = self._evaluate_and_control(final=True)
        return {
            "iter_num": p.iter_num,
            "val_loss": val_loss,
            "bound": self.last_bound,
            "acked": self.feed.acked,
            "double_acks": self.feed.double_acks,
            "dead_letters": self.feed.dead_letters,
            "reclaimed": self.feed.reclaimed,
            "checkpoint_written": written,
        }

    def _evaluate_and_control(self, final: bool = False) -> float:
        """One evaluation: the loss on the validation batches (diffusion: per
        stage) and the likelihood bound in bits/char; periodic ones use
        ``elbo_windows`` windows, the final one all of them. Plateau control and
        ``best_val_loss`` follow the validation loss (for ``objective=ar`` that is
        the NLL itself, on all windows every time: one forward pass per window,
        and ``best_val_loss`` then compares like with like)."""
        everything = final or self.s.objective == "ar"
        bound = self.likelihood_bound(0 if everything else self.s.elbo_windows)
        if self.s.objective == "ar":
            val_loss, per_stage = bound.nats, {}
        else:
            val_loss, per_stage = self.evaluate()
        name = "ar_nll" if self.s.objective == "ar" else "elbo"
        p = self.progress
        p.best_val_loss = min(p.best_val_loss, val_loss)
        p.history.append(
            {
                "iter": p.iter_num,
                "val_loss": val_loss,
                "stage": self.stage.active,
                "bound": name,
                "nats_per_char": bound.nats,
                "bits_per_char": bound.bits,
                "stderr_nats": bound.stderr,
                "windows": bound.windows,
            }
        )
        self.last_bound = bound
        if self.d.master:
            metrics.VAL_LOSS.labels("all").set(val_loss)
            metrics.VAL_BITS.labels(name).set(bound.bits)
            for stage, value in per_stage.items():
                metrics.VAL_LOSS.labels(str(stage)).set(value)
            stages = " ".join(f"{k}:{v:.3f}" for k, v in sorted(per_stage.items()))
            log.info(
                "iter %d: val loss %.4f%s; %s %s",
                p.iter_num,
                val_loss,
                f" (per stage {stages})" if stages else "",
                "ELBO" if name == "elbo" else "AR NLL",
                bound,
            )
            if self.wandb:
                self.wandb.log(
                    {"val_loss": val_loss, f"val_{name}_bits_per_char": bound.bits},
                    step=p.iter_num,
                )
        if not self.all_stages and not math.isnan(val_loss):
            # Patience comes from the contract: the stages the producers make.
            patience = self.meta["stages"]["train"][self.stage.active].get("val_loss_stale_count")
            # Every rank updates its stage state; the first one publishes it.
            if self.stage.update(val_loss, patience, self.n_stages) and self.d.master:
                self._publish_stage()
                metrics.ACTIVE_STAGE.set(self.stage.active)
                log.info("validation loss plateaued: advancing to stage %d", self.stage.active)
        return val_loss

    def close(self) -> None:
        self._gauges_stop.set()
        self.feed.close()
        if self.wandb:
            self.wandb.finish()
        if self.d.enabled:
            dist.destroy_process_group()
