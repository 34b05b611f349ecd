"""Background threads whose unexpected end is seen: logged, counted against readiness, and, past
a bound, the end of the process (after kopf's guarded root tasks)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)
RESTART_DELAYS = (1.0, 5.0, 30.0)
"""Waits before a failed loop runs again (the last one repeats)."""
MAX_RESTARTS = 5
"""Restarts of one loop within ``RESTART_WINDOW_S`` before the process gives up."""
RESTART_WINDOW_S = 600.0


class Spawn(Protocol):
    def __call__(self, run: Callable[[], None], name: str) -> threading.Thread:
        """Run ``run`` (a loop that returns only when told to stop) in a thread named ``name``."""
        ...


def start_guarded(run: Callable[[], None], name: str) -> threading.Thread:
    """Run ``run`` in a daemon thread; an exception escaping it is logged with the thread's
    name (a forever-loop that dies silently is an outage nobody sees). Unsupervised: for the
    CLI and tests; the node agent uses a :class:`Supervisor`."""

    def guarded() -> None:
        try:
            run()
        except BaseException:
            log.exception("%s stopped unexpectedly", name)
            raise

    thread = threading.Thread(target=guarded, name=name, daemon=True)
    thread.start()
    return thread


@dataclass
class Failure:
    name: str
    error: str
    at: float


class Supervisor:
    """The background loops of the node agent, on one stop signal.

    A loop that ends while ``stop`` is not set (by an exception or a return) is down: the agent
    is not healthy (not ready) until the loop runs again after its restart delay. More than
    ``max_restarts`` failures of one loop within ``window_s`` are fatal: ``on_fatal`` is called
    and the agent exits, so the kubelet restarts it and the DaemonSet's probes see it."""

    def __init__(
        self,
        stop: threading.Event,
        *,
        on_fatal: Callable[[Failure], object] | None = None,
        delays: Sequence[float] = RESTART_DELAYS,
        max_restarts: int = MAX_RESTARTS,
        window_s: float = RESTART_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stop = stop
        self._on_fatal = on_fatal
        self._delays = tuple(delays) or (1.0,)
        self._max = max_restarts
        self._window = window_s
        self._clock = clock
        self._lock = threading.RLock()
        self._down: dict[str, Failure] = {}
        self._history: dict[str, list[float]] = {}
        self._threads: list[threading.Thread] = []
        self.fatal: Failure | None = None
        self.changed = threading.Condition(self._lock)
        """Notified whenever a loop goes down or comes back."""

    def start(self, run: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=self._guard, args=(run, name), name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()
        return thread

    def healthy(self) -> bool:
        """No loop is down and nothing was fatal."""
        with self._lock:
            return not self._down and self.fatal is None

    def down(self) -> list[Failure]:
        with self._lock:
            return list(self._down.values())

    def join(self, timeout: float) -> list[str]:
        """Wait for every loop to end (call after setting ``stop``); the names still running."""
        deadline = self._clock() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - self._clock()))
        return [t.name for t in threads if t.is_alive()]

    def _guard(self, run: Callable[[], None], name: str) -> None:
        attempt = 0
        while not self.stop.is_set():
            try:
                run()
                if self.stop.is_set():
                    return
                error = "returned without being told to stop"
            except Exception as exc:
                log.exception("%s stopped unexpectedly", name)
                error = f"{type(exc).__name__}: {exc}"
            failure = Failure(name, error, self._clock())
            if not self._fail(failure):
                return
            self.stop.wait(self._delays[min(attempt, len(self._delays) - 1)])
            attempt += 1
            with self.changed:
                self._down.pop(name, None)
                self.changed.notify_all()
            if not self.stop.is_set():
                log.warning("%s started again after: %s", name, error)

    def _fail(self, failure: Failure) -> bool:
        """Record a failure; False when it is fatal (the loop stays down)."""
        with self.changed:
            self._down[failure.name] = failure
            recent = [
                t for t in self._history.get(failure.name, []) if failure.at - t < self._window
            ]
            recent.append(failure.at)
            self._history[failure.name] = recent
            fatal = len(recent) > self._max
            if fatal and self.fatal is None:
                self.fatal = failure
            self.changed.notify_all()
        if fatal:
            log.error(
                "%s failed %d times within %.0fs: the agent stops so it is restarted",
                failure.name,
                len(recent),
                self._window,
            )
            if self._on_fatal is not None:
                self._on_fatal(failure)
        return not fatal
