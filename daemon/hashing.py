"""One-pass fingerprints: sha256, xxh3-128 of the whole file, and xxh3-128 per fixed-size chunk.

Every byte is hashed exactly once, in the pass that writes it. sha256 checks the source's digest;
the xxh3 fingerprints make re-checks at rest cheap and let a damaged chunk be located and
re-fetched by range. hashlib and xxhash release the GIL on large buffers, so this runs well in
worker threads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import xxhash

CHUNK_SIZE = 16 * 1024 * 1024
"""Chunk size for per-chunk fingerprints, range requests and resume granularity."""


@dataclass(frozen=True)
class Fingerprint:
    """The fingerprints of one file's content."""

    size: int
    sha256: str
    """``sha256:<hex>``."""
    xxh3: str
    """xxh3-128 of the whole content, hex."""
    chunk_size: int
    chunks: bytes
    """Concatenated 16-byte xxh3-128 digests, one per chunk (the last may be short)."""

    def chunk_digest(self, index: int) -> bytes:
        return self.chunks[index * 16 : (index + 1) * 16]

    @property
    def chunk_count(self) -> int:
        return len(self.chunks) // 16


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return max(1, -(-size // chunk_size)) if size else 0


class StreamHasher:
    """Feeds bytes, in order, to sha256, xxh3-128 and the per-chunk xxh3-128."""

    def __init__(self, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self._sha = hashlib.sha256()
        self._whole = xxhash.xxh3_128()
        self._chunk = xxhash.xxh3_128()
        self._chunk_fill = 0
        self._chunks = bytearray()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Hash ``data``; return the digests of the chunks it completed."""
        view = memoryview(data)
        self._sha.update(view)
        self._whole.update(view)
        self.size += len(view)
        completed: list[bytes] = []
        while len(view):
            room = self.chunk_size - self._chunk_fill
            piece = view[:room]
            self._chunk.update(piece)
            self._chunk_fill += len(piece)
            view = view[len(piece) :]
            if self._chunk_fill == self.chunk_size:
                completed.append(self._close_chunk())
        return completed

    def _close_chunk(self) -> bytes:
        digest = self._chunk.digest()
        self._chunks += digest
        self._chunk = xxhash.xxh3_128()
        self._chunk_fill = 0
        return digest

    def finish(self) -> Fingerprint:
        if self._chunk_fill:
            self._close_chunk()
        return Fingerprint(
            size=self.size,
            sha256="sha256:" + self._sha.hexdigest(),
            xxh3=self._whole.hexdigest(),
            chunk_size=self.chunk_size,
            chunks=bytes(self._chunks),
        )


def chunk_xxh3(data: bytes | bytearray | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def sha256_stream(reader: IO[bytes], block: int = 8 * 1024 * 1024) -> tuple[str, int]:
    """``sha256:<hex>`` and length of everything ``reader`` yields."""
    h = hashlib.sha256()
    size = 0
    while chunk := reader.read(block):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def sha256_file(path: Path) -> tuple[str, int]:
    """``sha256:<hex>`` and size of a file's content."""
    with path.open("rb") as f:
        return sha256_stream(f)
