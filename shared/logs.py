"""Logging setup shared by the services' entry points."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
        force=True,
    )
