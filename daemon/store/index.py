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

from weightcache.daemon.hashing import Fingerprint
from weightcache.daemon.store.states import BlobState, ModelState

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
    trust       TEXT NOT NULL DEFAULT 'digest',
    repair_reason    TEXT NOT NULL DEFAULT '',
    repair_error     TEXT NOT NULL DEFAULT '',
    repair_failed_at REAL NOT NULL DEFAULT 0,
    signature        TEXT NOT NULL DEFAULT 'unchecked',
    signature_scheme TEXT NOT NULL DEFAULT '',
    signature_signer TEXT NOT NULL DEFAULT '',
    signature_detail TEXT NOT NULL DEFAULT '',
    signature_trust  TEXT NOT NULL DEFAULT ''
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
CREATE INDEX IF NOT EXISTS pins_by_holder ON pins(holder);
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
    repair_reason: str
    """Why the last repair failed (a short token), '' when none stands."""
    repair_error: str
    """The last repair failure in full (the operator's view)."""
    repair_failed_at: float
    """When it failed (epoch seconds), 0 when no failure stands."""
    signature: str = "unchecked"
    """:class:`~weightcache.daemon.signing.SignatureStatus` of the last check."""
    signature_scheme: str = ""
    """``oms`` or ``cosign`` when a signature was found."""
    signature_signer: str = ""
    """The trusted key or certificate file that verified it."""
    signature_detail: str = ""
    """Why it is not verified (tenant-readable)."""
    signature_trust: str = ""
    """Fingerprint of the keys and certificates the check trusted: a rule trusting other
    ones makes the next publish or warm check it again."""


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


def _fingerprint_columns(fp: Fingerprint) -> tuple[str, int, str, int, bytes]:
    return fp.sha256, fp.size, fp.xxh3, fp.chunk_size, fp.chunks


class Index:
    """Typed access to index.sqlite3."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(
            path, timeout=30.0, check_same_thread=False, isolation_level=None
        )
        self._lock = threading.RLock()
        # Reads go through a second connection: in WAL mode they never wait for a writer,
        # so a publish's lookup does not queue behind a fetch's commit and its fsync.
        self._reader = sqlite3.connect(
            path, timeout=30.0, check_same_thread=False, isolation_level=None
        )
        self._read_lock = threading.Lock()
        self._in_tx = threading.local()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
            columns = {str(r[1]) for r in self._conn.execute("PRAGMA table_info(models)")}
            # A store written before these were recorded: nothing it holds is public, and
            # the checks it made are not known.
            added = (
                ("access", "TEXT NOT NULL DEFAULT 'credentials'"),
                ("trust", "TEXT NOT NULL DEFAULT 'first-fetch'"),
                ("repair_reason", "TEXT NOT NULL DEFAULT ''"),
                ("repair_error", "TEXT NOT NULL DEFAULT ''"),
                ("repair_failed_at", "REAL NOT NULL DEFAULT 0"),
                ("signature", "TEXT NOT NULL DEFAULT 'unchecked'"),
                ("signature_scheme", "TEXT NOT NULL DEFAULT ''"),
                ("signature_signer", "TEXT NOT NULL DEFAULT ''"),
                ("signature_detail", "TEXT NOT NULL DEFAULT ''"),
                ("signature_trust", "TEXT NOT NULL DEFAULT ''"),
            )
            for name, definition in added:
                if name not in columns:
                    self._conn.execute(f"ALTER TABLE models ADD COLUMN {name} {definition}")
            self._conn.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._conn.close()

    @contextmanager
    def tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction (a write lock across processes). ``durable=False`` is for
        soft state that something else re-derives after a crash of the machine (pins: the
        mount table and the cluster; progress; last use): its commit is not fsynced on its
        own (WAL, synchronous=NORMAL) but by the next durable commit or checkpoint, so it
        never waits for the disk behind a fetch's writes. A killed process loses nothing."""
        with self._lock:
            if not durable:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            depth = getattr(self._in_tx, "depth", 0)
            self._in_tx.depth = depth + 1
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                self._in_tx.depth = depth
                if not durable:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
        if getattr(self._in_tx, "depth", 0):  # inside this thread's transaction: its view
            with self._lock:
                return list(self._conn.execute(sql, args))
        with self._read_lock:
            return list(self._reader.execute(sql, args))

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
                " bytes_total, access, trust) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(digest) DO UPDATE SET state = CASE WHEN state = ? THEN state"
                " ELSE excluded.state END, ref = excluded.ref, bytes_total = excluded.bytes_total,"
                " error = '', last_used = excluded.last_used, access = excluded.access,"
                " trust = excluded.trust",
                (
                    *(digest, ref, fmt, ModelState.FETCHING, now, now, total, access, trust),
                    ModelState.READY,
                ),
            )

    def set_progress(self, digest: str, done: int, total: int, rate: float, error: str) -> None:
        with self.tx(durable=False) as c:
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

    def set_signature(
        self, digest: str, status: str, scheme: str, signer: str, detail: str, trust: str
    ) -> None:
        """Record the outcome of a signature check with the model."""
        with self.tx() as c:
            c.execute(
                "UPDATE models SET signature = ?, signature_scheme = ?, signature_signer = ?,"
                " signature_detail = ?, signature_trust = ? WHERE digest = ?",
                (status, scheme, signer, detail, trust, digest),
            )

    def touch(self, digest: str) -> None:
        with self.tx(durable=False) as c:
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

    def pins_of(self, holder: str) -> list[tuple[str, str, str]]:
        rows = self.query(
            "SELECT model, kind, holder FROM pins WHERE holder = ? ORDER BY model, kind", (holder,)
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

    # -- ingestion, quarantine, eviction (the store's transactions) ------------------------------

    def held_blob_bytes(self) -> int:
        """Bytes of every blob the store holds (a missing one holds nothing)."""
        return self.scalar(
            "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE state != ?", (BlobState.MISSING,)
        )

    def oldest_verification(self) -> float:
        """When the least recently verified blob of a ready model was last verified (0: none)."""
        return self.scalar(
            "SELECT COALESCE(MIN(b.verified_at), 0) FROM blobs b"
            " JOIN model_files f ON f.sha256 = b.sha256 JOIN models m ON m.digest = f.model"
            " WHERE b.state = ? AND m.state = ?",
            (BlobState.OK, ModelState.READY),
        )

    def recent_failures(self, limit: int) -> list[tuple[str, float, str, str]]:
        """(sha256, at, mode, detail) of the latest failed checks, newest first."""
        rows = self.query(
            "SELECT sha256, at, mode, detail FROM verifications WHERE ok = 0"
            " ORDER BY at DESC LIMIT ?",
            (limit,),
        )
        return [(str(a), float(str(b)), str(c), str(d)) for a, b, c, d in rows]

    def blob_digests(self) -> list[str]:
        return [str(r[0]) for r in self.query("SELECT sha256 FROM blobs")]

    def record_blob(
        self, fp: Fingerprint, inode: int, mtime_ns: int, model: str, path: str
    ) -> None:
        """A committed blob (its fingerprints, inode and mtime) and that ``model`` holds it at
        ``path``, in one transaction."""
        with self.tx() as c:
            c.execute(
                "INSERT INTO blobs(sha256, size, xxh3, chunk_size, chunks, inode, mtime_ns,"
                " state, verified_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(sha256) DO UPDATE SET size = excluded.size, xxh3 = excluded.xxh3,"
                " chunk_size = excluded.chunk_size, chunks = excluded.chunks,"
                " inode = excluded.inode, mtime_ns = excluded.mtime_ns, state = excluded.state,"
                " verified_at = excluded.verified_at",
                (
                    fp.sha256,
                    fp.size,
                    fp.xxh3,
                    fp.chunk_size,
                    fp.chunks,
                    inode,
                    mtime_ns,
                    BlobState.OK,
                    time.time(),
                ),
            )
            c.execute(
                "INSERT OR REPLACE INTO model_files(model, path, sha256) VALUES (?, ?, ?)",
                (model, path, fp.sha256),
            )

    def record_blobs(self, rows: Sequence[tuple[Fingerprint, int, int, str, str]]) -> None:
        """A batch of committed blobs, each (fingerprint, inode, mtime_ns, model, path) as for
        :meth:`record_blob`, in one transaction (one commit and one fsync for all of them)."""
        now = time.time()
        with self.tx() as c:
            c.executemany(
                "INSERT INTO blobs(sha256, size, xxh3, chunk_size, chunks, inode, mtime_ns,"
                " state, verified_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(sha256) DO UPDATE SET size = excluded.size, xxh3 = excluded.xxh3,"
                " chunk_size = excluded.chunk_size, chunks = excluded.chunks,"
                " inode = excluded.inode, mtime_ns = excluded.mtime_ns, state = excluded.state,"
                " verified_at = excluded.verified_at",
                [
                    (*_fingerprint_columns(fp), ino, mt, BlobState.OK, now)
                    for fp, ino, mt, _, _ in rows
                ],
            )
            c.executemany(
                "INSERT OR REPLACE INTO model_files(model, path, sha256) VALUES (?, ?, ?)",
                [(model, path, fp.sha256) for fp, _, _, model, path in rows],
            )

    def link_files(
        self, model: str, rows: Sequence[tuple[str, str]], *, durable: bool = True
    ) -> None:
        """``model`` holds already recorded blobs at these (path, sha256), in one transaction.
        Not durable on its own is safe: the rows name only blobs already durable, and the
        model's installation commits durably after them (WAL keeps commit order)."""
        with self.tx(durable=durable) as c:
            c.executemany(
                "INSERT OR REPLACE INTO model_files(model, path, sha256) VALUES (?, ?, ?)",
                [(model, path, sha) for path, sha in rows],
            )

    def link_file(self, model: str, path: str, sha256: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO model_files(model, path, sha256) VALUES (?, ?, ?)",
                (model, path, sha256),
            )

    def forget_files(self, digest: str, keep: set[str]) -> None:
        with self.tx() as c:
            for (path,) in c.execute(
                "SELECT path FROM model_files WHERE model = ?", (digest,)
            ).fetchall():
                if path not in keep:
                    c.execute(
                        "DELETE FROM model_files WHERE model = ? AND path = ?", (digest, path)
                    )

    def set_installed(self, digest: str) -> None:
        """The model is ready: its size and file count from its records, progress complete."""
        with self.tx() as c:
            size, files = c.execute(
                "SELECT COALESCE(SUM(b.size), 0), COUNT(*) FROM model_files f"
                " JOIN blobs b ON b.sha256 = f.sha256 WHERE f.model = ?",
                (digest,),
            ).fetchone()
            c.execute(
                "UPDATE models SET state = ?, error = '', size = ?, files = ?, ready_at = ?,"
                " bytes_done = bytes_total, rate = 0, repair_reason = '', repair_error = '',"
                " repair_failed_at = 0 WHERE digest = ?",
                (ModelState.READY, size, files, time.time(), digest),
            )

    def set_repair_failed(
        self, digest: str, damage: str, reason: str, error: str, at: float
    ) -> None:
        """A repair failed: the model is corrupt again with its ``damage``, and why."""
        with self.tx() as c:
            c.execute(
                "UPDATE models SET state = ?, error = ?, repair_reason = ?, repair_error = ?,"
                " repair_failed_at = ? WHERE digest = ?",
                (ModelState.CORRUPT, damage, reason, error, at, digest),
            )

    def mark_blob_missing(self, sha256: str, error: str) -> None:
        """A recorded blob gone from disk: it and every ready model using it are marked."""
        with self.tx() as c:
            c.execute("UPDATE blobs SET state = ? WHERE sha256 = ?", (BlobState.MISSING, sha256))
            c.execute(
                "UPDATE models SET state = ?, error = ? WHERE state = ? AND digest IN "
                "(SELECT model FROM model_files WHERE sha256 = ?)",
                (ModelState.CORRUPT, error, ModelState.READY, sha256),
            )

    def record_quarantine(
        self, digest: str, path: str, sha256: str, reason: str, *, blob_lost: bool
    ) -> None:
        """A file of ``digest`` was quarantined: the model is corrupt, and when the blob itself
        was lost (the damaged inode was the blob), so is the blob and every model using it."""
        error = f"{path}: {reason}"
        with self.tx() as c:
            if blob_lost:
                c.execute(
                    "UPDATE blobs SET state = ? WHERE sha256 = ?", (BlobState.CORRUPT, sha256)
                )
                c.execute(
                    "UPDATE models SET state = ?, error = ? WHERE digest IN"
                    " (SELECT model FROM model_files WHERE sha256 = ?)",
                    (ModelState.CORRUPT, error, sha256),
                )
            c.execute(
                "UPDATE models SET state = ?, error = ? WHERE digest = ?",
                (ModelState.CORRUPT, error, digest),
            )
            c.execute(
                "INSERT INTO verifications(sha256, at, mode, ok, detail)"
                " VALUES (?, ?, 'quarantine', 0, ?)",
                (sha256, time.time(), f"{digest} {error}"),
            )

    def pin(self, digest: str, kind: str, holder: str) -> None:
        """Idempotent; a pin is a use: last_used moves in the same transaction."""
        now = time.time()
        with self.tx(durable=False) as c:
            c.execute(
                "INSERT OR IGNORE INTO pins(model, kind, holder, created_at) VALUES (?, ?, ?, ?)",
                (digest, kind, holder, now),
            )
            c.execute("UPDATE models SET last_used = ? WHERE digest = ?", (now, digest))

    def unpin(self, digest: str, kind: str, holder: str) -> None:
        with self.tx(durable=False) as c:
            c.execute(
                "DELETE FROM pins WHERE model = ? AND kind = ? AND holder = ?",
                (digest, kind, holder),
            )

    def forget_model(self, digest: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM model_files WHERE model = ?", (digest,))
            c.execute("DELETE FROM models WHERE digest = ?", (digest,))
            c.execute("DELETE FROM refs WHERE digest = ?", (digest,))

    def orphan_blobs(self) -> list[str]:
        """Blobs no model file names any more."""
        return [
            str(r[0])
            for r in self.query(
                "SELECT sha256 FROM blobs WHERE sha256 NOT IN (SELECT sha256 FROM model_files)"
            )
        ]

    def forget_blob(self, sha256: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))

    def model_has_blob(self, digest: str, sha256: str) -> bool:
        return bool(
            self.scalar(
                "SELECT 1 FROM model_files WHERE model = ? AND sha256 = ? LIMIT 1",
                (digest, sha256),
            )
        )

    def file_sha(self, digest: str, path: str) -> str | None:
        rows = self.query(
            "SELECT sha256 FROM model_files WHERE model = ? AND path = ?", (digest, path)
        )
        return str(rows[0][0]) if rows else None

    def record_verification(self, sha256: str, mode: str, ok: bool, detail: str) -> None:
        """A passing check replaces the earlier passes of its mode and moves ``verified_at``."""
        now = time.time()
        with self.tx() as c:
            if ok:
                c.execute(
                    "DELETE FROM verifications WHERE sha256 = ? AND mode = ? AND ok = 1",
                    (sha256, mode),
                )
                c.execute("UPDATE blobs SET verified_at = ? WHERE sha256 = ?", (now, sha256))
            c.execute(
                "INSERT INTO verifications(sha256, at, mode, ok, detail) VALUES (?, ?, ?, ?, ?)",
                (sha256, now, mode, int(ok), detail),
            )

    def scrub_rows(self) -> list[tuple[str, str, str]]:
        """(blob, model, path) for held blobs of ready models, least recently verified first."""
        rows = self.query(
            "SELECT b.sha256, f.model, f.path FROM blobs b"
            " JOIN model_files f ON f.sha256 = b.sha256"
            " JOIN models m ON m.digest = f.model"
            " WHERE b.state = ? AND m.state = ? ORDER BY b.verified_at, b.sha256",
            (BlobState.OK, ModelState.READY),
        )
        return [(str(a), str(b), str(c)) for a, b, c in rows]
