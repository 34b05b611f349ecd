"""The one owner of damage: quarantine, marking, scheduling repairs, backoff, restore.

Checks (the scrubber, a publish's fast or full check, ``weightcache verify``) only find
problems; they hand them here. The repairer quarantines every damaged file first (each model
using a damaged blob turns corrupt and is refused to new mounts), then starts one repair per
model: the same content, by digest, from the source it came from, fetching only the damaged
chunks of a quarantined copy where it can (:meth:`Fetcher.refetch_async`). A repair that fails
is recorded in the index as data (reason, message, time), and asking again within
``backoff_s`` answers from that record instead of asking the source again (the kubelet retries
a refused publish every few seconds). A successful fetch of the model, or of another model
that brings the blobs back, restores it (:meth:`Store.install` clears the record).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Protocol

from weightcache.daemon.errors import RepairFailed, SourceError, WeightcacheError
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import Problem

log = logging.getLogger(__name__)
REPAIR_BACKOFF_S = 60.0
"""How long a failed repair is answered from the index before the source is asked again."""


class Refetch(Protocol):
    def refetch_async(self, digest: str) -> Future[ModelRow]:
        """Fetch a held model's content again, by digest, from its source."""
        ...


class Repairs(Protocol):
    """What the CSI node asks of the repairer (:class:`Repairer`; a recording fake in tests)."""

    def damaged(self, problems: Sequence[Problem], *, repair: bool = True) -> None: ...

    def repair(self, digest: str) -> Future[ModelRow]: ...

    def failure(self, digest: str) -> RepairFailed | None: ...


class Repairer:
    def __init__(
        self,
        store: Store,
        fetcher: Refetch | None,
        *,
        on_damage: Callable[[Problem], None] | None = None,
        backoff_s: float = REPAIR_BACKOFF_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``fetcher`` None: damage is quarantined and marked, never repaired (the CLI's
        ``verify``). ``on_damage`` hears of each problem after its quarantine (Node events)."""
        self._store = store
        self._fetcher = fetcher
        self._on_damage = on_damage
        self._backoff = backoff_s
        self._clock = clock
        self._inflight: dict[str, Future[ModelRow]] = {}
        self._lock = threading.Lock()

    def damaged(self, problems: Sequence[Problem], *, repair: bool = True) -> None:
        """Quarantine every problem's file, then (with ``repair``) start the repair of each
        model concerned. The order matters: a repair that restored one model before another
        user of the same blob was quarantined would have its fresh blob moved out again."""
        for problem in problems:
            self._store.quarantine(problem.model, problem.path, problem.sha256, problem.reason)
            log.warning(
                "model %s file %s: %s; quarantined", problem.model, problem.path, problem.reason
            )
            if self._on_damage is not None:
                try:
                    self._on_damage(problem)
                except Exception:
                    log.exception("reporting the damage failed")
        if repair:
            for model in dict.fromkeys(p.model for p in problems):
                self.repair(model)

    def repair(self, digest: str) -> Future[ModelRow]:
        """Start (or join) the repair of a corrupt model. Within the backoff after a failure,
        the answer is that failure, from the index."""
        with self._lock:
            running = self._inflight.get(digest)
            if running is not None:
                return running
            out: Future[ModelRow] = Future()
            row = self._store.model(digest)
            failed = self._recent_failure(row)
            if failed is not None or self._fetcher is None:
                out.set_exception(failed or RepairFailed(f"{digest}: no source to repair from"))
                return out
            self._inflight[digest] = out
        damage = row.error if row is not None else ""  # the fetch's own failure replaces it
        fut = self._fetcher.refetch_async(digest)
        fut.add_done_callback(lambda done: self._settle(digest, damage, done, out))
        return out

    def failure(self, digest: str) -> RepairFailed | None:
        """The last repair failure recorded for ``digest``, while it stands."""
        row = self._store.model(digest)
        if row is None or not row.repair_failed_at:
            return None
        return RepairFailed(row.repair_error, reason=row.repair_reason)

    def _recent_failure(self, row: ModelRow | None) -> RepairFailed | None:
        if row is None or not row.repair_failed_at:
            return None
        if self._clock() - row.repair_failed_at >= self._backoff:
            return None
        return RepairFailed(row.repair_error, reason=row.repair_reason)

    def _settle(
        self, digest: str, damage: str, done: Future[ModelRow], out: Future[ModelRow]
    ) -> None:
        """Record the outcome before anyone waiting on ``out`` can look at the index."""
        exc = done.exception()
        try:
            if exc is not None and isinstance(exc, WeightcacheError):
                reason = exc.reason if isinstance(exc, SourceError) else type(exc).__name__
                self._store.repair_failed(digest, damage, reason, str(exc), self._clock())
                log.warning("repair of %s failed: %s", digest, exc)
        finally:
            with self._lock:
                self._inflight.pop(digest, None)
            if exc is not None:
                out.set_exception(exc)
            else:
                out.set_result(done.result())
