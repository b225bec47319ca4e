"""Which Redis faults a service waits out and which ones a human must fix.

An outage, a restart, a server still loading its AOF or a full server
(``maxmemory``) pass: services back off and try again, logging once when the
state changes. So does a key of ours that someone replaced with another kind of
value (WRONGTYPE): services wait, saying which, until an operator deletes it. A
refused password, a missing permission or a database number the server lacks never
passes by itself: services stop with exit code 2 and a message naming the setting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    OutOfMemoryError,
)

from shared.streams import TRANSIENT_ERRORS, Backoff, DatabaseIndexError, WrongTypeError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Credentials or permissions: waiting does not help. (redis-py's authentication
# errors subclass ConnectionError, so catch these before TRANSIENT_ERRORS.)
REFUSED: tuple[type[Exception], ...] = (
    AuthenticationError,
    AuthorizationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    DatabaseIndexError,
)
# At maxmemory with noeviction Redis refuses writes that grow memory: that is
# backpressure, which consumers' acks and deletes relieve.
FULL: tuple[type[Exception], ...] = (OutOfMemoryError,)
# A key of ours holding another kind of value waits for an operator's DEL, like an outage.
PASSING: tuple[type[Exception], ...] = (*TRANSIENT_ERRORS, *FULL, WrongTypeError)


def refusal_message(exc: Exception, service: str, user: str | None = None) -> str:
    """What to fix when Redis refuses ``service``'s credentials or a command.
    ``user``: the Redis ACL user it connected as (redis_username), named in the message."""
    if isinstance(exc, DatabaseIndexError):
        return (
            f"{service}: Redis has no database of the number redis_url names ({exc}). The "
            "number after the port (redis://host:6379/0) must be below the server's "
            "`databases` setting (16 unless configured); 0 is always there."
        )
    who = f"user {user!r}" if user else "its Redis user (redis_username, else the URL's)"
    if isinstance(exc, NoPermissionError):
        # Redis 7.0 names the command when the command is denied, but not which command
        # touched a denied key; ACL LOG (as admin) names both.
        return (
            f"{service}: Redis refused a command to {who} ({exc}). That role lacks a "
            f"permission {service} needs: check redis_username (the {service} role's own "
            "user) and the server's ACL (deploy/redis/acl.sh); an operator sees the command "
            "and key with `redis-cli --user admin --askpass ACL LOG 5`."
        )
    return (
        f"{service}: Redis refused the credentials of {who} ({exc}). Set the right password "
        "with redis_password_file (or REDIS_PASSWORD / --redis_password) and the user with "
        "redis_username (or in redis_url)."
    )


class RedisState:
    """Whether Redis answers, logged once per change (not once per retry)."""

    def __init__(self, name: str, on_change: Callable[[bool], None] | None = None) -> None:
        self.name, self.on_change = name, on_change
        self.up = True

    def failed(self, exc: Exception) -> None:
        if self.up:
            self.up = False
            if isinstance(exc, WrongTypeError):
                log.error(
                    "%s: a key of this namespace holds another kind of value (WRONGTYPE %s); "
                    "someone wrote it by hand. Waiting until an operator deletes it (DEL the "
                    "key of the command that failed: the stream, the contract, the stage or "
                    "the bound)",
                    self.name,
                    exc,
                )
            else:
                log.warning(
                    "%s: Redis %s (%s); waiting it out",
                    self.name,
                    "is full (maxmemory)"
                    if isinstance(exc, FULL)
                    else "is unavailable (check redis_url if it never answers)",
                    exc,
                )
            if self.on_change is not None:
                self.on_change(False)

    def recovered(self) -> None:
        if not self.up:
            self.up = True
            log.info("%s: Redis answers again", self.name)
            if self.on_change is not None:
                self.on_change(True)


def ride_out(
    op: Callable[[], T],
    stop: threading.Event,
    state: RedisState,
    *,
    give_up_on_stop: bool = True,
) -> T | None:
    """Run ``op`` until it succeeds, backing off through outages and a full
    Redis; None if ``stop`` is set first (and ``give_up_on_stop``). Refused
    credentials or permissions are raised: a human must act."""
    backoff = Backoff(cap=2.0)
    while True:
        try:
            result = op()
        except REFUSED:
            raise
        except PASSING as exc:
            state.failed(exc)
            if give_up_on_stop and stop.is_set():
                return None
            stop.wait(backoff.next_delay()) if give_up_on_stop else _sleep(backoff.next_delay())
            continue
        state.recovered()
        return result


def _sleep(seconds: float) -> None:
    threading.Event().wait(seconds)


def is_missing_group(exc: redis.ResponseError) -> bool:
    """XREADGROUP/XAUTOCLAIM on a group Redis lost (a restart without persistence)."""
    return str(exc).startswith("NOGROUP")
