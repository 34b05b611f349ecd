"""The store's SQLite index (WAL): models, their files, blobs, pins, refs and verifications.

One connection per Index object, serialised by a lock, so worker threads share it safely;
several processes (the node agent and a ``weightcache warm``) share the file through WAL and a
busy timeout. Every multi-row change is one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    digest      TEXT PRIMARY KEY,
    ref         TEXT NOT NULL,
    format      TEXT NOT NULL,
    state       TEXT NOT NULL,
    size        INTEGER NOT NULL DEFAULT 0,
    files       INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    last_used   REAL NOT NULL,
    ready_at    REAL,
    bytes_done  INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    rate        REAL NOT NULL DEFAULT 0,
    error       TEXT NOT NULL DEFAULT '',
    access      TEXT NOT NULL DEFAULT 'credentials',
    trust       TEXT NOT NULL DEFAULT 'digest'
);
CREATE TABLE IF NOT EXISTS blobs (
    sha256      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    xxh3        TEXT NOT NULL,
    chunk_size  INTEGER NOT NULL,
    chunks      BLOB NOT NULL,
    inode       INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    state       TEXT NOT NULL DEFAULT 'ok',
    verified_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_files (
    model   TEXT NOT NULL REFERENCES models(digest) ON DELETE CASCADE,
    path    TEXT NOT NULL,
    sha256  TEXT NOT NULL REFERENCES blobs(sha256),
    PRIMARY KEY (model, path)
);
CREATE INDEX IF NOT EXISTS model_files_by_blob ON model_files(sha256);
CREATE TABLE IF NOT EXISTS pins (
    model      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    holder     TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (model, kind, holder)
);
CREATE TABLE IF NOT EXISTS refs (
    ref         TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    resolved_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS verifications (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256  TEXT NOT NULL,
    at      REAL NOT NULL,
    mode    TEXT NOT NULL,
    ok      INTEGER NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS verifications_by_blob ON verifications(sha256, mode, ok);
"""


@dataclass(frozen=True)
class ModelRow:
    digest: str
    ref: str
    format: str
    state: str
    size: int
    files: int
    created_at: float
    last_used: float
    ready_at: float | None
    bytes_done: int
    bytes_total: int
    rate: float
    error: str
    access: str
    """How the node obtained it: ``anonymous`` (public on this node) or ``credentials``."""
    trust: str
    """``digest``: every file was checked against a digest the source announced (or hashed
    locally); ``first-fetch``: some file had none and was taken as first fetched."""


@dataclass(frozen=True)
class BlobRow:
    sha256: str
    size: int
    xxh3: str
    chunk_size: int
    chunks: bytes
    inode: int
    mtime_ns: int
    state: str
    verified_at: float


class FileRecord(NamedTuple):
    path: str
    sha256: str
    size: int | None
    """None (with the rest) when the blob is not recorded."""
    inode: int | None
    mtime_ns: int | None
    state: str | None


class Index:
    """Typed access to index.sqlite3."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(
            path, timeout=30.0, check_same_thread=False, isolation_level=None
        )
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            columns = {str(r[1]) for r in self._conn.execute("PRAGMA table_info(models)")}
            # A store written before these were recorded: nothing it holds is public, and
            # the checks it made are not known.
            for name, default in (("access", "credentials"), ("trust", "first-fetch")):
                if name not in columns:
                    self._conn.execute(
                        f"ALTER TABLE models ADD COLUMN {name} TEXT NOT NULL DEFAULT '{default}'"
                    )
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction (a write lock across processes)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return list(self._conn.execute(sql, args))

    def scalar(self, sql: str, args: Sequence[object] = ()) -> int:
        """The first column of the first row as an int (0 when NULL or no row)."""
        rows = self.query(sql, args)
        value = rows[0][0] if rows else None
        return int(value) if isinstance(value, int | float | str) else 0

    # -- models --------------------------------------------------------------------------------

    def model(self, digest: str) -> ModelRow | None:
        rows = self.query("SELECT * FROM models WHERE digest = ?", (digest,))
        return ModelRow(*rows[0]) if rows else None  # type: ignore[arg-type]

    def models(self) -> list[ModelRow]:
        return [ModelRow(*r) for r in self.query("SELECT * FROM models ORDER BY created_at")]  # type: ignore[arg-type]

    def upsert_fetching(
        self, digest: str, ref: str, fmt: str, total: int, access: str, trust: str
    ) -> None:
        now = time.time()
        with self.tx() as c:
            c.execute(
                "INSERT INTO models(digest, ref, format, state, created_at, last_used,"
                " bytes_total, access, trust) VALUES (?, ?, ?, 'fetching', ?, ?, ?, ?, ?)"
                " ON CONFLICT(digest) DO UPDATE SET state = CASE WHEN state = 'ready' THEN state"
                " ELSE 'fetching' END, ref = excluded.ref, bytes_total = excluded.bytes_total,"
                " error = '', last_used = excluded.last_used, access = excluded.access,"
                " trust = excluded.trust",
                (digest, ref, fmt, now, now, total, access, trust),
            )

    def set_progress(self, digest: str, done: int, total: int, rate: float, error: str) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE models SET bytes_done = ?, bytes_total = ?, rate = ?, error = ?"
                " WHERE digest = ?",
                (done, total, rate, error, digest),
            )

    def set_state(self, digest: str, state: str, error: str = "") -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE models SET state = ?, error = ? WHERE digest = ?", (state, error, digest)
            )

    def touch(self, digest: str) -> None:
        with self.tx() as c:
            c.execute("UPDATE models SET last_used = ? WHERE digest = ?", (time.time(), digest))

    def model_files(self, digest: str) -> list[tuple[str, str]]:
        """(path, sha256) of a model, sorted by path."""
        return [
            (str(p), str(s))
            for p, s in self.query(
                "SELECT path, sha256 FROM model_files WHERE model = ? ORDER BY path", (digest,)
            )
        ]

    # -- blobs ---------------------------------------------------------------------------------

    def blob(self, sha256: str) -> BlobRow | None:
        rows = self.query("SELECT * FROM blobs WHERE sha256 = ?", (sha256,))
        return BlobRow(*rows[0]) if rows else None  # type: ignore[arg-type]

    def model_file_records(self, digest: str) -> list[FileRecord]:
        """What a fast check compares, for every file of a model, in one query."""
        rows = self.query(
            "SELECT f.path, f.sha256, b.size, b.inode, b.mtime_ns, b.state FROM model_files f"
            " LEFT JOIN blobs b ON b.sha256 = f.sha256 WHERE f.model = ? ORDER BY f.path",
            (digest,),
        )
        return [FileRecord(*r) for r in rows]  # type: ignore[arg-type]

    def fully_verified(self, sha256: str) -> bool:
        """Whether a full re-hash of this blob ever passed (it stays valid while the file's
        inode, size and mtime are unchanged: blobs are never rewritten in place)."""
        return bool(
            self.scalar(
                "SELECT 1 FROM verifications WHERE sha256 = ? AND mode = 'full' AND ok = 1 LIMIT 1",
                (sha256,),
            )
        )

    # -- pins and refs -------------------------------------------------------------------------

    def pins(self, digest: str | None = None) -> list[tuple[str, str, str]]:
        if digest is None:
            rows = self.query("SELECT model, kind, holder FROM pins ORDER BY model, kind, holder")
        else:
            rows = self.query(
                "SELECT model, kind, holder FROM pins WHERE model = ? ORDER BY kind, holder",
                (digest,),
            )
        return [(str(m), str(k), str(h)) for m, k, h in rows]

    def ref_digest(self, ref: str) -> str | None:
        rows = self.query("SELECT digest FROM refs WHERE ref = ?", (ref,))
        return str(rows[0][0]) if rows else None

    def refs(self) -> list[tuple[str, str]]:
        """Every (reference, digest) resolved so far."""
        return [(str(r), str(d)) for r, d in self.query("SELECT ref, digest FROM refs")]

    def remember_ref(self, ref: str, digest: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO refs(ref, digest, resolved_at) VALUES (?, ?, ?)",
                (ref, digest, time.time()),
            )
