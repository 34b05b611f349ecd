"""Retries as data: a tuple of backoff delays, jitter, Retry-After honoured, a stop event.

Only :class:`SourceError` with ``retryable=True`` is retried (5xx, 429, connection errors,
truncated bodies); other failures surface at once.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from weightcache.daemon.errors import SourceError

T = TypeVar("T")
log = logging.getLogger(__name__)


class Stopped(Exception):
    """The stop event was set while waiting to retry."""


class RetryAfter(SourceError):
    """A retryable error that carries the server's requested delay (HTTP 429/503 Retry-After)."""

    def __init__(
        self, message: str, *, reason: str, delay: float, status: int | None = None
    ) -> None:
        super().__init__(message, reason=reason, retryable=True, status=status)
        self.delay = delay


MAX_RETRY_AFTER_S = 300.0


def with_retries(
    op: Callable[[], T],
    delays: Sequence[float],
    *,
    what: str,
    stop: threading.Event | None = None,
    on_retry: Callable[[SourceError], None] | None = None,
) -> T:
    """Run ``op``; on a retryable :class:`SourceError` wait the next delay and try again."""
    stop = stop or threading.Event()
    attempt = 0
    while True:
        try:
            return op()
        except SourceError as exc:
            if not exc.retryable or attempt >= len(delays):
                raise
            delay = delays[attempt] * (0.5 + random.random())  # full jitter around the step
            if isinstance(exc, RetryAfter):
                delay = max(delay, min(exc.delay, MAX_RETRY_AFTER_S))
            attempt += 1
            log.info("%s: %s; retry %d/%d in %.2fs", what, exc, attempt, len(delays), delay)
            if on_retry is not None:
                on_retry(exc)
            if stop.wait(delay):
                raise Stopped(what) from exc
