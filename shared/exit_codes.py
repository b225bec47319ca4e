"""Exit codes every service uses, so that scripts, compose restart policies
and people read one meaning per number (listed in the README)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # Unexpected: a bug, reported with a traceback.
    FAILURE = 1
    # A setting is wrong, or Redis refused it (password, permission): fix the named setting.
    CONFIG = 2
    # Redis or a checkpoint holds another dataset contract, or the checkpoint is unreadable.
    CONTRACT = 3
