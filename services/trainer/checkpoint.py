"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint holds only tensors and plain Python values (dicts, lists, str,
int, float, bool, None), so loading it never unpickles arbitrary objects.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "ckpt.pt"


def checkpoint_path(out_dir: Path) -> Path:
    return out_dir / CHECKPOINT_NAME


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, fsync it, rename it over
    ``path`` and fsync the directory: a crash leaves the old or the new
    checkpoint, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first, or use --init_from=scratch")
    return torch.load(path, map_location=device, weights_only=True)


def unwrapped_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without DDP's ``module.`` or torch.compile's
    ``_orig_mod.`` prefixes, so any later run can load them."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return inner.state_dict()
