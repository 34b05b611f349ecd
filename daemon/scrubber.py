"""The scrubber: re-hash everything the store holds, forever, least recently verified first.

Each held blob that a ready model uses is read chunk by chunk (with O_DIRECT where the
filesystem allows, so the scrub neither evicts the page cache that pods are reading from nor is
fooled by a clean cached copy of a rotten disk block) and each chunk's xxh3 is compared with the
one recorded when the file was downloaded. The tree entries that name the blob get the fast
check too (a file replaced behind the store's back). Reads go through a token bucket so
serving pods keep the disk: by default at the lowest rate that completes a pass within
``[scrub] interval_s`` (set at each pass's start from the bytes it will check), or at a fixed
``bytes_per_s``.

What it finds goes to the repairer (:mod:`weightcache.daemon.repair`): the file is
quarantined, every model using it turns corrupt (new mounts refused, naming the file) and a
repair starts: only the damaged chunks are fetched again where the source serves ranges.
Existing mounts are left alone: unmounting under a running pod would break it,
while removing the file from the tree already stops any new open of the bad bytes, and most
inference servers have read their weights into GPU memory long before.
"""

from __future__ import annotations

import errno
import logging
import math
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from weightcache.daemon.config import PACED, ScrubConfig
from weightcache.daemon.hashing import chunk_xxh3
from weightcache.daemon.metrics import Metrics
from weightcache.daemon.ratelimit import RateLimiter
from weightcache.daemon.store.index import BlobRow
from weightcache.daemon.store.states import BlobState
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import Problem, metadata_problem
from weightcache.daemon.threads import Spawn, start_guarded

log = logging.getLogger(__name__)
READ_AHEAD = 2
"""Chunks being read while one is hashed."""
SPLIT = 4
"""O_DIRECT reads in flight per chunk (READ_AHEAD x SPLIT requests of chunk / SPLIT bytes).
Measured over 2 GiB of blobs, 2 x 1 (the earlier reader) read at about the rate of dd, below
cat's readahead; 2 x 4 and 4 x 1 to 8 x 1 about 10-20% faster, 2 x 4 with the least memory (three
chunk buffers). Buffered reads with drop-behind (posix_fadvise WILLNEED/DONTNEED) were as fast
but cost 2-3x the CPU for the copy from the page cache, and could still be fooled by a clean
cached copy of a rotten block."""


@dataclass
class ScrubPass:
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    complete: bool = True
    """False when the pass was stopped part-way."""


@dataclass
class ScrubStats:
    """What the metrics read: plain counters, updated by the scrubber thread only."""

    bytes_verified: int = 0
    failures: int = 0
    passes: int = 0
    last_pass_seconds: float = 0.0
    last_pass_files: int = 0


class Scrubber:
    def __init__(
        self,
        store: Store,
        damaged: Callable[[Sequence[Problem]], object],
        config: ScrubConfig,
        *,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        """``damaged`` receives the problems found in one blob (the repairer's
        :meth:`~weightcache.daemon.repair.Repairer.damaged`)."""
        self._store = store
        self._damaged = damaged
        self._config = config
        self._stop = stop
        self._clock = clock
        self._limiter = RateLimiter(max(config.bytes_per_s, 0), stop, clock=clock)
        self.stats = ScrubStats()
        self._reader = ThreadPoolExecutor(
            max_workers=READ_AHEAD * SPLIT, thread_name_prefix="scrub-read"
        )
        self._metrics = metrics or Metrics()
        self._done = threading.Condition()

    def start(self, spawn: Spawn = start_guarded) -> threading.Thread:
        return spawn(self.run, "scrubber")

    def run(self) -> None:
        while not self._stop.is_set():
            result = self.scrub_pass()
            if result.files == 0:
                self._stop.wait(self._config.idle_s)

    def wait_for_passes(self, count: int, timeout: float) -> bool:
        """Block until ``count`` passes have completed; False on timeout."""
        with self._done:
            return self._done.wait_for(lambda: self.stats.passes >= count, timeout)

    def scrub_pass(self) -> ScrubPass:
        """One pass over every held blob, least recently verified first."""
        result = ScrubPass()
        started = self._clock()
        order = self._store.scrub_order()
        if self._config.bytes_per_s == PACED:
            self._pace(order)
        for sha, users in order:
            if self._stop.is_set():
                result.complete = False
                break
            blob = self._store.blob_row(sha)
            if blob is None or blob.state != BlobState.OK:
                continue  # quarantined meanwhile
            result.files += 1
            try:
                problems = self._check(blob, users)
            except OSError as exc:
                # Evicted or quarantined under us, or the disk failing: log, go on; the
                # next pass looks again.
                log.warning("scrub: blob %s: %s", sha, exc)
                continue
            result.bytes += blob.size if not problems else 0
            result.problems += problems
        result.seconds = self._clock() - started
        if self._stop.is_set():
            result.complete = False  # the last file may have been cut short
        if result.complete:
            with self._done:
                self.stats.passes += 1
                self.stats.last_pass_seconds = result.seconds
                self.stats.last_pass_files = result.files
                self._done.notify_all()
            if result.files:
                log.info(
                    "scrub pass: %d files, %d bytes in %.1fs (%.0f MB/s), %d problem(s)",
                    result.files,
                    result.bytes,
                    result.seconds,
                    result.bytes / 1e6 / result.seconds if result.seconds else 0.0,
                    len(result.problems),
                )
        return result

    @property
    def rate(self) -> int:
        """The read rate in force, bytes per second; 0: unlimited."""
        return self._limiter.rate

    def _pace(self, order: list[tuple[str, list[tuple[str, str]]]]) -> None:
        """The lowest rate that checks everything in ``order`` within ``[scrub] interval_s``."""
        if self._config.interval_s <= 0:
            self._limiter.set_rate(0)
            return
        total = 0
        for sha, _ in order:
            blob = self._store.blob_row(sha)
            total += blob.size if blob is not None else 0
        rate = max(1, math.ceil(total / self._config.interval_s))
        self._limiter.set_rate(rate)
        if total:
            log.info(
                "scrub pass of %d bytes at %d bytes/s: one pass per %.0fs",
                total,
                rate,
                self._config.interval_s,
            )

    def _check(self, blob: BlobRow, users: list[tuple[str, str]]) -> list[Problem]:
        problems = []
        bad = self._hash(blob)
        if bad is None:
            return []  # evicted under us, or stopping: nothing to judge
        if bad:
            reason = f"content differs in {len(bad)} chunk(s)"
            problems = [Problem(model, path, blob.sha256, reason, bad) for model, path in users]
        else:
            self._store.record_verification(blob.sha256, "full", True, "scrub")
            for model, path in users:
                reason_fast = metadata_problem(
                    str(self._store.model_path(model) / path), blob.size, blob.inode, blob.mtime_ns
                )
                if reason_fast is not None:
                    problems.append(Problem(model, path, blob.sha256, reason_fast))
        if problems:
            self.stats.failures += len(problems)
            self._metrics.verify_failures.inc(len(problems))
            for problem in problems:
                log.warning(
                    "scrub: model %s file %s: %s", problem.model, problem.path, problem.reason
                )
            self._damaged(problems)  # every user of the blob at once
        return problems

    def _hash(self, blob: BlobRow) -> tuple[int, ...] | None:
        """Indices of the chunks whose xxh3 differs (a short file's missing tail included), or
        None if the blob file is gone or the scrub was stopped before its end."""
        path = self._store.blob_path(blob.sha256)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fd = os.open(path, os.O_RDONLY)  # tmpfs and friends: no O_DIRECT
        chunk, count = blob.chunk_size, len(blob.chunks) // 16
        # Page-aligned buffers (O_DIRECT needs alignment); READ_AHEAD chunks are read, each as
        # SPLIT requests at once, while a chunk is hashed: the disk sees a queue, as with the
        # kernel's readahead for `cat`, and the page cache is never filled.
        bufs = [mmap.mmap(-1, chunk) for _ in range(READ_AHEAD + 1)]
        views = [memoryview(b) for b in bufs]
        piece = _piece_size(chunk)

        def read(i: int) -> list[Future[int]]:
            # Wait on the rate cap before the chunk's reads go out, never inside a reader.
            self._limiter.consume(min(chunk, blob.size - i * chunk))
            view = views[i % len(views)]
            return [
                self._reader.submit(_pread_into, fd, view[at : at + piece], i * chunk + at)
                for at in range(0, chunk, piece)
            ]

        bad = []
        checked = 0
        pending: deque[list[Future[int]]] = deque()
        queued = 0
        try:
            while checked < count:
                while queued < count and len(pending) < READ_AHEAD and not self._stop.is_set():
                    pending.append(read(queued))
                    queued += 1
                if not pending:
                    break  # stopping
                futs = pending.popleft()
                wait(futs)  # all of them, even if one failed: the finally closes the fd
                n = sum(fut.result() for fut in futs)
                i = checked
                length = min(chunk, blob.size - i * chunk)
                self.stats.bytes_verified += n
                self._metrics.verify_bytes.inc(n)
                digest = chunk_xxh3(views[i % len(views)][:n])
                if n != length or digest != blob.chunks[i * 16 : (i + 1) * 16]:
                    bad.append(i)  # short (a read error in any piece) or different
                checked += 1
        finally:
            for futs in pending:
                for fut in futs:
                    fut.exception()  # never close the fd or buffers under a read in flight
            for view in views:
                view.release()
            for buf in bufs:
                buf.close()
            os.close(fd)
        if checked < count:
            return None  # stopped part-way: no verdict
        return tuple(bad)


def _piece_size(chunk: int) -> int:
    """One read request's size: chunk / SPLIT, kept a multiple of the page size (O_DIRECT)."""
    piece = chunk // SPLIT // mmap.PAGESIZE * mmap.PAGESIZE
    return piece if piece and chunk % piece == 0 else chunk


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset`` until it is full or the file ends; bytes read. A read
    error (EIO: the medium itself failing) ends the chunk short, which marks it damaged."""
    got = 0
    while got < len(view):
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            log.warning("scrub: read error at offset %d: %s", offset + got, exc)
            break
        if n == 0:
            break
        got += n
    return got
