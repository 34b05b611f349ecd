"""A token bucket for bytes: the download cap and the scrubber's I/O rate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    """A token bucket shared by its users (all downloads, or the scrubber); 0 means unlimited."""

    def __init__(
        self,
        bytes_per_s: int,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = bytes_per_s
        self._stop = stop
        self._clock = clock
        self._lock = threading.Lock()
        self._next = clock()

    @property
    def rate(self) -> int:
        """Bytes per second in force; 0: unlimited."""
        return self._rate

    def set_rate(self, bytes_per_s: int) -> None:
        """Change the rate for what is consumed from now on (0: unlimited)."""
        with self._lock:
            self._rate = bytes_per_s

    def consume(self, n: int) -> None:
        """Wait until ``n`` more bytes fit under the rate (the stop event cuts the wait)."""
        if self._rate <= 0:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + n / self._rate
            wait = start - now
        if wait > 0:
            self._stop.wait(wait)
