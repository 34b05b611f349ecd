"""Partial downloads in staging/: resumable, fingerprinted chunk by chunk, locked per file.

``<key>.part`` holds the bytes written so far, always a prefix of the object; ``<key>.chunks``
is an append-only log of the xxh3-128 of each completed chunk. After a crash the prefix is
re-read once and each chunk checked against the log: matching chunks are kept (and fed to the
sha256 again, since a hash state cannot be saved), the first chunk that does not match and
everything after it is dropped. So a restart re-downloads at most the chunk in flight per file.
Chunks are not fsynced one by one: the log entry is only trusted when the bytes on disk match it,
and the whole file is fsynced before it is committed.

Writes use O_DIRECT where the filesystem allows it: the bytes go from the (page-aligned) read
buffer to the device without a copy into the page cache. On this path that halves the kernel's
CPU time and leaves no dirty backlog for the final fsync. The unaligned tail of a file, and
filesystems without O_DIRECT (tmpfs), use ordinary buffered writes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from weightcache.daemon.errors import UnsafeContent
from weightcache.daemon.hashing import Fingerprint, StreamHasher, chunk_xxh3

_ENTRY = 16
WAIT_POLL_S = 0.05
ALIGN = 4096
DIRECT_MIN = 1024 * 1024
"""Files smaller than this are written buffered: a direct write waits for the device on every
call, which for a small file costs more than the copy it saves (and small files are synced in
batches, see :class:`weightcache.daemon.store.store.Batch`)."""


class AlignedWriter:
    """Positional writes through O_DIRECT where the filesystem allows it, buffered otherwise.

    Only the page-aligned part of a write whose offset is aligned goes direct; the tail and
    everything on filesystems that refuse O_DIRECT go through ``fd`` as usual."""

    def __init__(self, path: Path, fd: int, *, direct: bool = True) -> None:
        self._fd = fd
        self._direct = -1
        if not direct:
            return
        try:
            self._direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise

    def close(self) -> None:
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write at ``offset``; ``data`` should start page-aligned (an mmap) to go direct."""
        view = memoryview(data)
        aligned = len(view) & ~(ALIGN - 1)
        if self._direct >= 0 and aligned and offset % ALIGN == 0:
            try:
                _pwrite_all(self._direct, view[:aligned], offset)
                view, offset = view[aligned:], offset + aligned
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.close()  # this filesystem refuses it after all
        _pwrite_all(self._fd, view, offset)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def stage_stream(
    path: Path,
    reader: IO[bytes],
    size: int,
    buf: mmap.mmap,
    chunk_size: int,
    *,
    fsync: bool = True,
) -> Fingerprint:
    """Write exactly ``size`` bytes from ``reader`` to a new file at ``path``, fingerprinting
    them in the same pass, and fsync it (``fsync=False``: the caller syncs the filesystem
    before anything names the file). ``buf`` (page-aligned) carries the bytes, so reads land
    where the direct write takes them from."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    writer = AlignedWriter(path, fd, direct=size >= DIRECT_MIN)
    hasher = StreamHasher(chunk_size=chunk_size)
    view = memoryview(buf)
    try:
        offset = 0
        while offset < size:
            want = min(len(view), size - offset)
            filled = 0
            while filled < want:
                n = reader.readinto(view[filled:want])  # type: ignore[attr-defined]
                if not n:
                    raise UnsafeContent(
                        f"{path.name}: stream ended {size - offset - filled} bytes early"
                    )
                filled += n
            hasher.update(view[:filled])
            writer.write(offset, view[:filled])
            offset += filled
        if fsync:
            os.fsync(fd)
    finally:
        writer.close()
        os.close(fd)
    return hasher.finish()


class PartialFile:
    """One object being downloaded into staging. Use as a context manager (holds a flock)."""

    def __init__(self, staging: Path, key: str, size: int, chunk_size: int) -> None:
        self.path = staging / f"{key}.part"
        self.log_path = staging / f"{key}.chunks"
        self.size = size
        self.chunk_size = chunk_size
        self._fd = -1
        self._writer: AlignedWriter | None = None
        self._log_fd = -1
        self.on_wait: Callable[[], None] | None = None
        """Called while the lock is held elsewhere (see :meth:`_lock`)."""

    def __enter__(self) -> PartialFile:
        # Two writers (threads or processes) never share a partial file: the second waits for
        # the first, then re-opens if the first committed it (renamed it into blobs/) meanwhile,
        # so it can never write into a committed blob.
        while True:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._lock()
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self._fd)
        self._log_fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._writer = AlignedWriter(self.path, self._fd, direct=self.size >= DIRECT_MIN)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_io()
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1

    def _lock(self) -> None:
        """Take the flock. While another holder keeps it, ``on_wait`` runs every
        ``WAIT_POLL_S``: a fetch that waits commits its own batch meanwhile, so two fetches
        whose batches each hold a file the other waits for never wait for each other."""
        if self.on_wait is None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            return
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                self.on_wait()
                time.sleep(WAIT_POLL_S)

    def release_io(self) -> None:
        """Close what writing needed, keeping only the locked descriptor: a written file that
        waits for its batch's commit holds its lock with one descriptor."""
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def resume(self, hasher: StreamHasher, also: Callable[[bytes], object] | None = None) -> int:
        """Check the kept prefix against the chunk log; feed it to ``hasher`` (and ``also``);
        return its length."""
        log = os.pread(self._log_fd, os.fstat(self._log_fd).st_size, 0)
        disk = os.fstat(self._fd).st_size
        good = 0
        for i in range(len(log) // _ENTRY):
            start = i * self.chunk_size
            length = min(self.chunk_size, self.size - start)
            if length <= 0 or start + length > disk:
                break
            data = os.pread(self._fd, length, start)
            if len(data) != length or chunk_xxh3(data) != log[i * _ENTRY : (i + 1) * _ENTRY]:
                break
            hasher.update(data)
            if also is not None:
                also(data)
            good = start + length
        kept_chunks = -(-good // self.chunk_size) if good else 0
        os.ftruncate(self._fd, good)
        os.ftruncate(self._log_fd, kept_chunks * _ENTRY)
        return good

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert self._writer is not None, "use PartialFile as a context manager"
        self._writer.write(offset, data)

    def record_chunks(self, digests: list[bytes]) -> None:
        if digests:
            os.write(self._log_fd, b"".join(digests))

    def fsync(self) -> None:
        os.fsync(self._fd)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)

    def forget_log(self) -> None:
        self.log_path.unlink(missing_ok=True)
