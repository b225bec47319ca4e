"""Benchmarks; run them as modules from the repository root (python -m benchmarks.NAME)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def with_defaults(argv: list[str]) -> list[str]:
    """A benchmark's settings: the ``tiny`` preset unless one is given, and a local
    corpus unless ``--corpus_path`` is given: ``CORPUS_PATH``, else ``TINYSHAKESPEARE``,
    else the team's copy beside the repository when there is one (otherwise the
    preset's corpus is downloaded once, as for any run)."""
    argv = list(argv)
    if not any(a.startswith("--preset=") for a in argv):
        argv.insert(0, "--preset=tiny")
    if not any(a.startswith("--corpus_path=") for a in argv):
        # A path the user named is used as is: a missing file fails with the loader's message.
        named = os.environ.get("CORPUS_PATH") or os.environ.get("TINYSHAKESPEARE")
        team_copy = REPO.parent / "shared/data/tinyshakespeare.txt"
        if named:
            argv.append(f"--corpus_path={Path(named).expanduser()}")
        elif team_copy.is_file():
            argv.append(f"--corpus_path={team_copy}")
    return argv
