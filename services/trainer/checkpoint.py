"""The trainer's checkpoint: one typed record, written atomically, read with
``weights_only=True``.

The trainer saves it, resumes from it and checks it against the contract in
Redis; the sampler and the local stack read it. On disk it is a plain dict of
tensors and Python values (dicts, lists, str, int, float, bool, None), so
loading it never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from services.trainer.model import MaskedLM, ModelConfig
from shared.contract import check_meta
from shared.streams import StreamKeys

CHECKPOINT_NAME = "ckpt.pt"
LOCK_NAME = ".trainer.lock"  # held by the trainer that writes CHECKPOINT_NAME
# torch.compile and DistributedDataParallel wrap the model and prefix its keys.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not a trainer checkpoint;
    the message names the file."""


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (a full disk, a read-only or vanished
    directory); the checkpoint already there is untouched. The message names
    the file and the cause."""


def checkpoint_path(out_dir: Path) -> Path:
    return out_dir / CHECKPOINT_NAME


def would_replace(out_dir: Path, init_from: str, fields_set: set[str]) -> str | None:
    """Why a start must not go on: ``out_dir`` holds a checkpoint, and nobody asked to
    start over (init_from is "scratch" only by default). A run started there again by
    mistake would overwrite it silently; asking is cheap."""
    path = checkpoint_path(out_dir)
    if init_from != "scratch" or "init_from" in fields_set or not path.is_file():
        return None
    return (
        f"{path} holds the checkpoint of an earlier run: --init_from=resume continues it, "
        "--init_from=scratch replaces it, another --out_dir keeps it"
    )


# Left in out_dir by a trainer that stopped because the model diverged: the same settings
# are not run again there (a restart policy would resume and diverge again, on the GPUs).
DIVERGED_NAME = "diverged.json"


def settings_digest(settings: Any) -> str:
    """sha256 of every public setting but ``init_from`` (which a restart changes)."""
    values = {k: v for k, v in settings.public_dict().items() if k != "init_from"}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def mark_diverged(out_dir: Path, settings: Any, iter_num: int, message: str) -> Path:
    """Record that a run with ``settings`` diverged in ``out_dir`` (atomically)."""
    path = out_dir / DIVERGED_NAME
    record = {"settings_sha256": settings_digest(settings), "iter": iter_num, "why": message}
    tmp = path.with_name(f".{DIVERGED_NAME}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def diverged_before(out_dir: Path, settings: Any) -> str | None:
    """Why a start must not go on: a run with these same settings diverged in
    ``out_dir`` (:func:`mark_diverged`). None otherwise; a record of other settings (or
    an unreadable one) is removed, as the settings were changed since."""
    path = out_dir / DIVERGED_NAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("settings_sha256") != settings_digest(settings):
        with contextlib.suppress(OSError):  # every rank tries; one wins
            path.unlink(missing_ok=True)
        return None
    return (
        f"the last run in {out_dir} with these same settings diverged at iter "
        f"{record.get('iter')} ({str(record.get('why'))[:400]}); change a setting (a lower "
        f"--learning_rate, say) or delete {path} to run them again as they are"
    )


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete what writes of a killed trainer left (``.ckpt.pt.*.tmp``, each the
    size of a checkpoint); call it holding :func:`hold_out_dir`, so no live
    writer owns one. Returns the bytes freed."""
    freed = 0
    for stale in out_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        try:
            size = stale.stat().st_size
            stale.unlink()
            freed += size
        except FileNotFoundError:
            continue
    return freed


class OutDirInUse(Exception):
    """Another live trainer holds the run directory; exit code 2."""


def hold_out_dir(out_dir: Path) -> IO[str]:
    """An exclusive lock on ``out_dir`` for as long as the returned file stays
    open (this process's life): two trainers writing one checkpoint would
    overwrite each other's. The kernel drops it when the holder dies, kill -9
    included, so a restarted trainer takes it again at once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = (out_dir / LOCK_NAME).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise OutDirInUse(
            f"out_dir {out_dir} is in use by another trainer ({holder}): give this run its own "
            "--out_dir, or stop that trainer first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def unwrapped_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's weights without DDP's ``module.`` or torch.compile's
    ``_orig_mod.`` prefixes, so any later run can load them."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return inner.state_dict()


def _malformed(checkpoint: Checkpoint) -> str | None:
    """What in a checkpoint's fields is not of its kind (weights_only loads any plain
    values: a number where a string was, a list where the weights were), else None."""
    config = checkpoint.model_config
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        value = getattr(config, name)
        if type(value) is not int or value < 1:
            return f"model_config.{name} = {value!r}, not a positive integer"
    if type(config.dropout) not in (int, float) or not 0 <= config.dropout < 1:
        return f"model_config.dropout = {config.dropout!r}, not a number in [0, 1)"
    if type(config.causal) is not bool:
        return f"model_config.causal = {config.causal!r}, not true or false"
    if config.n_embd % config.n_head:
        return f"model_config.n_embd = {config.n_embd} is no multiple of n_head = {config.n_head}"
    weights = checkpoint.model
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()
    ):
        return "model is not a table of named tensors"
    if not isinstance(checkpoint.itos, list) or not all(
        isinstance(c, str) for c in checkpoint.itos
    ):
        return "itos is not a list of strings"
    if type(checkpoint.mask_token_id) is not int:
        return f"mask_token_id = {checkpoint.mask_token_id!r}, not an integer"
    for name in ("iter_num", "tokens"):
        if type(getattr(checkpoint, name)) is not int:
            return f"{name} = {getattr(checkpoint, name)!r}, not an integer"
    for name in ("meta", "stage", "stream", "settings"):
        if not isinstance(getattr(checkpoint, name), dict):
            return f"{name} is not a table"
    if not isinstance(checkpoint.history, list) or not all(
        isinstance(h, dict) for h in checkpoint.history
    ):
        return "history is not a list of tables"
    return None


@dataclass
class Checkpoint:
    """Everything a run needs to resume, and a sampler needs to generate."""

    model: dict[str, Tensor]
    model_config: ModelConfig
    itos: list[str]
    mask_token_id: int
    fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # the dataset contract it trained on
    iter_num: int = 0
    tokens: int = 0
    best_val_loss: float = math.inf
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per evaluation
    stage: dict[str, Any] = field(default_factory=dict)  # the plateau controller's state
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    stream: dict[str, Any] = field(default_factory=dict)  # namespace, group, world, ack policy
    settings: dict[str, Any] = field(default_factory=dict)  # the run's settings, secrets masked

    REQUIRED = ("model", "model_config", "itos", "mask_token_id")

    # ------------------------------------------------------------ writing

    def save(self, path: Path) -> None:
        """Write to a temporary file in the same directory, fsync it, rename it
        over ``path`` and fsync the directory: a crash leaves the old or the new
        checkpoint, never a torn one."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state["model_config"] = dataclasses.asdict(self.model_config)
        # Only plain values: the contract round-trips through JSON.
        state["meta"] = json.loads(json.dumps(self.meta))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            # torch.save reports a failed write (ENOSPC, say) as a RuntimeError of its
            # zip writer raised while handling the OSError: both are the disk's doing.
            cause = exc if isinstance(exc, OSError) else exc.__context__
            if isinstance(exc, OSError | RuntimeError) and isinstance(cause, OSError):
                raise CheckpointWriteError(f"cannot write checkpoint {path}: {cause}") from exc
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    # ------------------------------------------------------------ reading

    @classmethod
    def load(
        cls,
        path: Path,
        device: str | torch.device = "cpu",
        missing: str = "train first, or use --init_from=scratch",
    ) -> Checkpoint:
        """Read and check ``path``; every problem is a :class:`CheckpointError`.
        ``missing``: what to do when there is no file (the caller's own advice)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}: {missing}")
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:  # torn files and foreign pickles fail in many types
            raise CheckpointError(
                f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}): not a whole "
                "torch checkpoint of plain values (truncated, still being written, another "
                "kind of file, or one that would run code on loading)"
            ) from exc
        return cls.from_state(state, path)

    @classmethod
    def from_state(cls, state: Any, path: Path | str = "<memory>") -> Checkpoint:
        if not isinstance(state, dict) or any(k not in state for k in cls.REQUIRED):
            raise CheckpointError(
                f"checkpoint {path} is not a trainer checkpoint "
                f"(needs keys {', '.join(cls.REQUIRED)})"
            )
        try:
            # Ignore config keys a newer trainer may add; missing ones fall to defaults.
            names = {f.name for f in dataclasses.fields(ModelConfig)}
            config = ModelConfig(**{k: v for k, v in state["model_config"].items() if k in names})
            known = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in state.items() if k in known}
            checkpoint = cls(**{**values, "model_config": config})
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {path} has malformed fields: {exc}") from exc
        if problem := _malformed(checkpoint):
            raise CheckpointError(f"checkpoint {path} has malformed fields: {problem}")
        itos, mask_id = checkpoint.itos, checkpoint.mask_token_id
        if len(itos) != config.vocab_size or not 0 <= mask_id < len(itos):
            raise CheckpointError(
                f"checkpoint {path} is inconsistent: {len(itos)} symbols in itos, "
                f"vocab_size={config.vocab_size}, mask_token_id={mask_id}"
            )
        return checkpoint

    def build_model(self, device: str | torch.device = "cpu") -> MaskedLM:
        """The checkpoint's model with its weights, on ``device``, in train mode."""
        model = MaskedLM(self.model_config)
        weights = {}
        for key, value in self.model.items():
            for prefix in WRAPPER_PREFIXES:
                key = key.removeprefix(prefix)
            weights[key] = value
        try:
            model.load_state_dict(weights)
        except RuntimeError as exc:  # missing/unexpected keys, shape mismatches
            raise CheckpointError(
                f"checkpoint weights do not match its model_config: {exc}"
            ) from exc
        return model.to(device)

    def check_contract(self, keys: StreamKeys, meta: dict[str, Any]) -> None:
        """Raise ``ContractMismatch`` (with the differences) when ``meta``, the
        contract in Redis, is not the one this checkpoint trained on."""
        if self.fingerprint != meta["fingerprint"]:
            check_meta(keys, meta, {**self.meta, "fingerprint": self.fingerprint})

    def weights_digest(self) -> int:
        """A 62-bit digest of the model's weights (names, dtypes, shapes and bytes): equal
        for copies of one checkpoint, different for any other."""
        h = hashlib.blake2b(digest_size=8)
        for name in sorted(self.model):
            tensor = self.model[name].detach().cpu().contiguous()
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            h.update(tensor.view(-1).view(torch.uint8).numpy())
        return int.from_bytes(h.digest(), "little") >> 2

    def last_val_loss(self) -> float | None:
        """The validation loss of the last evaluation, if the run made one."""
        return self.history[-1]["val_loss"] if self.history else None
