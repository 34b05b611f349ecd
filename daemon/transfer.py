"""Moving one remote object's bytes, in order, through reused buffers.

:func:`ordered_parts` keeps up to ``len(buffers)`` range requests in flight and yields the parts
strictly in order (sha256 needs order); a part's buffer is reused once the consumer asks for the
next one, so memory stays at buffers x part size however large the object. :class:`PartStream`
turns those parts into a readable stream for decompressors and tar.
"""

from __future__ import annotations

import io
import mmap
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

ReadInto = Callable[[int, memoryview], None]
"""Fills the view with the object's bytes from the given offset (retries included)."""


def ordered_parts(
    read_into: ReadInto,
    size: int,
    offset: int,
    part: int,
    buffers: Sequence[mmap.mmap],
    pool: ThreadPoolExecutor,
    stop: threading.Event,
) -> Iterator[memoryview]:
    """Yield the object's bytes from ``offset`` as in-order views of at most ``part`` bytes.

    A view is valid until the next item is requested. On any failure ``stop`` is set and every
    request still in flight is waited for before the exception propagates."""
    starts = iter(range(offset, size, part))

    def fetch(start: int, buf: mmap.mmap) -> memoryview:
        view = memoryview(buf)[: min(part, size - start)]
        read_into(start, view)
        return view

    window: list[tuple[mmap.mmap, Future[memoryview]]] = [
        (buf, pool.submit(fetch, start, buf)) for buf, start in zip(buffers, starts, strict=False)
    ]
    try:
        while window:
            buf, fut = window.pop(0)
            yield fut.result()
            nxt = next(starts, None)
            if nxt is not None:
                window.append((buf, pool.submit(fetch, nxt, buf)))
    except BaseException:
        stop.set()
        for _, pending in window:
            pending.cancel()
        wait([pending for _, pending in window])
        raise


class PartStream(io.RawIOBase):
    """A readable stream over in-order parts; every byte read is also given to ``observe``."""

    def __init__(self, parts: Iterator[memoryview], observe: Callable[[memoryview], None]) -> None:
        super().__init__()
        self._parts = parts
        self._observe = observe
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while not len(self._current):
            nxt = next(self._parts, None)
            if nxt is None:
                return 0
            self._observe(nxt)
            self._current = nxt
        n = min(len(b), len(self._current))
        b[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def drain(self) -> int:
        """Consume what is left (tar padding past the end-of-archive marker); return its size."""
        left = len(self._current)
        self._current = memoryview(b"")
        for view in self._parts:
            self._observe(view)
            left += len(view)
        return left
