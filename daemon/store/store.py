"""The content-addressed, crash-safe model store.

Guarantees (each method's docstring adds its own):
- Nothing appears under ``models/`` until every byte of the model has been checked against its
  sha256 and fsynced; a tree is built in ``staging/`` and renamed into place in one step.
- Blobs are immutable (0444), named by sha256, and stored once however many models use them.
- The index is the source of truth; opening a store reconciles the disk with it without hashing
  anything: unknown trees, blobs and temporary files are removed, partial downloads are kept.
- Pinned models and models being fetched are never evicted.
- Removing what is already gone is not an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from weightcache.daemon.config import StoreConfig
from weightcache.daemon.errors import DigestMismatch, InsufficientSpace
from weightcache.daemon.hashing import Fingerprint
from weightcache.daemon.store.catalog import Pin
from weightcache.daemon.store.index import BlobRow, Index, ModelRow
from weightcache.daemon.store.layout import (
    Layout,
    dir_bytes,
    fsync_dir,
    remove_tree,
    seal_tree,
    sync_filesystem,
)
from weightcache.daemon.store.staging import PartialFile
from weightcache.daemon.store.states import Access, BlobState, ModelState, Trust

log = logging.getLogger(__name__)

BATCH_FILES = 256
"""Small files committed together: one filesystem sync and one index transaction for all."""


@dataclass(frozen=True)
class Usage:
    """Bytes held and allowed."""

    blob_bytes: int
    staging_bytes: int
    budget: int
    fs_free: int
    reserve: int = 0
    """Free space the store leaves on its filesystem (``[store] reserve_fraction``)."""

    @property
    def used(self) -> int:
        return self.blob_bytes + self.staging_bytes

    @property
    def room(self) -> int:
        """Bytes that may still be written before the filesystem's free space reaches the
        reserve."""
        return max(0, self.fs_free - self.reserve)


def measure_usage(config: StoreConfig, layout: Layout, index: Index) -> Usage:
    """Bytes held and allowed, from the index and the filesystem: the one place the budget and
    the reserve are computed (read-only callers such as ``weightcache status`` use it too)."""
    vfs = os.statvfs(layout.root)
    size = vfs.f_blocks * vfs.f_frsize
    reserve = max(int(size * config.reserve_fraction), config.reserve_bytes)
    budget = config.budget_bytes or max(0, size - reserve)
    return Usage(
        index.held_blob_bytes(),
        dir_bytes(layout.staging),
        budget,
        vfs.f_bavail * vfs.f_frsize,
        reserve,
    )


class Store:
    """A store directory and its index. Thread-safe; safe to share between processes."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.layout = Layout(config.root)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.layout.create()
        self._lock_fd = os.open(self.layout.lock, os.O_RDWR | os.O_CREAT, 0o600)
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self.index = Index(self.layout.index)
        self.evictions = 0
        """Models this process evicted (a counter for the metrics)."""
        with self.locked():
            self._reconcile()

    def close(self) -> None:
        self.index.close()
        os.close(self._lock_fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The store-wide lock held around installs, evictions, pins of ready models and
        reconciliation: a flock between processes and a lock between this process's threads
        (a flock alone lets every thread of the process in). Re-entrant."""
        with self._thread_lock:
            if self._lock_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # raises before anything is counted
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- reconciliation ------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """Make the disk agree with the index. Stats files; never hashes them."""
        lay = self.layout
        known_blobs = {sha.removeprefix("sha256:") for sha in self.index.blob_digests()}
        on_disk = set()
        for sub in lay.blobs.iterdir():
            for f in sub.iterdir():
                if f.name not in known_blobs:
                    log.info("removing blob unknown to the index: %s", f)
                    f.unlink(missing_ok=True)
                else:
                    on_disk.add(f.name)
        for hexd in known_blobs - on_disk:
            self._mark_blob_missing("sha256:" + hexd)
        installed = {
            row.digest.removeprefix("sha256:"): row
            for row in self.index.models()
            if row.state in (ModelState.READY, ModelState.CORRUPT)
        }
        for tree in lay.models.iterdir():
            if tree.name not in installed:
                log.info("removing model tree unknown to the index: %s", tree)
                remove_tree(tree)
        for hexd, row in installed.items():
            if not (lay.models / hexd).is_dir():
                log.warning("model %s lost its tree; rebuilding from blobs", row.digest)
                try:
                    self._build_tree(row.digest)
                except FileNotFoundError:
                    self.index.set_state(row.digest, ModelState.CORRUPT, "tree and blobs missing")
        for entry in lay.staging.iterdir():
            if entry.name.endswith((".part", ".chunks", ".lock")):
                continue  # resumable downloads and fetch locks: clean_staging decides
            remove_tree(entry)
        self.clean_staging()

    def clean_staging(self) -> int:
        """Remove what no fetch will use again: partial downloads (and their chunk logs) not
        written for ``partial_max_age_s``, chunk logs without a partial, and fetch locks nobody
        holds. A partial or lock some fetch holds is never touched. Returns the bytes freed."""
        freed = 0
        horizon = time.time() - self.config.partial_max_age_s
        for entry in sorted(self.layout.staging.iterdir()):
            name = entry.name
            if name.endswith(".lock"):
                _remove_if_unlocked(entry, entry)
            elif name.endswith(".part"):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    # A second link means the partial was committed as a blob and a crash
                    # came before its staged name went: nothing is left to resume.
                    stale = st.st_mtime < horizon or st.st_nlink > 1
                    if stale and _remove_if_unlocked(entry, entry, entry.with_suffix(".chunks")):
                        log.info("removed a partial download nobody resumed: %s", name)
                        freed += st.st_blocks * 512
            elif name.endswith(".chunks") and not entry.with_suffix(".part").exists():
                entry.unlink(missing_ok=True)
        return freed

    def _mark_blob_missing(self, sha256: str) -> None:
        self.index.mark_blob_missing(sha256, f"blob {sha256} is missing from the store")

    # -- staging -------------------------------------------------------------------------------

    def partial(self, key: str, size: int, chunk_size: int) -> PartialFile:
        return PartialFile(self.layout.staging, key, size, chunk_size)

    def temp_path(self, hint: str = "tmp") -> Path:
        return self.layout.staging / f"{hint}-{uuid.uuid4().hex}"

    def fetch_lock(self, digest: str) -> FetchLock:
        return FetchLock(self.layout.staging / f"{digest.removeprefix('sha256:')}.lock")

    # -- blobs ---------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.layout.blob(sha256)

    def has_blob(self, sha256: str) -> bool:
        row = self.index.blob(sha256)
        return row is not None and row.state == BlobState.OK and self.layout.blob(sha256).exists()

    def ingest(
        self, digest: str, ref: str, fmt: str, total: int, access: Access, trust: Trust
    ) -> Ingest:
        """Start (or resume) the ingestion of one model: see :class:`Ingest`."""
        self.begin(digest, ref, fmt, total, access, trust)
        return Ingest(self, digest, ref)

    def _commit_blob(self, staged: Path, fp: Fingerprint, model: str, path: str) -> None:
        """Move a verified, fsynced file into blobs/ (or drop it if the blob is already held)
        and record that ``model`` holds it at ``path``."""
        target = self.layout.blob(fp.sha256)
        target.parent.mkdir(exist_ok=True)
        if not self.has_blob(fp.sha256):
            os.chmod(staged, 0o444)
            try:
                # link, never replace: a blob another thread committed first keeps its inode,
                # which trees and the fast re-check rely on.
                os.link(staged, target)
            except FileExistsError:
                if not self.has_blob(fp.sha256):
                    os.replace(staged, target)  # an untrusted leftover, not a committed blob
            fsync_dir(target.parent)
        st = os.stat(target)
        self.index.record_blob(fp, st.st_ino, st.st_mtime_ns, model, path)
        # Last: until the index knows the blob, a crash finds the staged file (and its chunk
        # log) where it was and resumes from it; a blob the index does not know is removed
        # when the store opens.
        staged.unlink(missing_ok=True)

    def _commit_blobs(self, entries: Sequence[tuple[Path, Fingerprint, str]], model: str) -> None:
        """Commit verified staged files written without their own fsync, as one batch: link
        them all into blobs/, make the data and the names durable with one filesystem sync,
        then record them in one index transaction. A crash before the transaction leaves
        blobs the index does not know (removed when the store opens) and staged files (removed,
        or resumed from if they are partials): never an index row for a blob not on disk."""
        linked: set[str] = set()
        for staged, fp, _ in entries:
            if fp.sha256 in linked or self.has_blob(fp.sha256):
                continue
            target = self.layout.blob(fp.sha256)
            target.parent.mkdir(exist_ok=True)
            os.chmod(staged, 0o444)
            try:
                os.link(staged, target)  # link, never replace: see _commit_blob
            except FileExistsError:
                if not self.has_blob(fp.sha256):
                    # An untrusted leftover, or a batch of another thread not yet recorded:
                    # this copy's data is made durable before it takes the name.
                    fd = os.open(staged, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.replace(staged, target)
            linked.add(fp.sha256)
        if linked:
            sync_filesystem(self.layout.root)
        rows = []
        for _, fp, path in entries:
            st = os.stat(self.layout.blob(fp.sha256))
            rows.append((fp, st.st_ino, st.st_mtime_ns, model, path))
        self.index.record_blobs(rows)
        for staged, _, _ in entries:
            staged.unlink(missing_ok=True)

    def link_blob(self, model: str, path: str, sha256: str) -> None:
        """Record that ``model`` holds an already stored blob at ``path``. Not fsynced on its
        own: the blob is durable already and the model's installation commits durably."""
        self.index.link_files(model, [(path, sha256)], durable=False)

    # -- models --------------------------------------------------------------------------------

    def model(self, digest: str) -> ModelRow | None:
        return self.index.model(digest)

    def model_path(self, digest: str) -> Path:
        return self.layout.model(digest)

    def begin(
        self, digest: str, ref: str, fmt: str, total: int, access: Access, trust: Trust
    ) -> None:
        """Record a model as being fetched (kept ``ready`` if it already is), how it is
        obtained and what its bytes are checked against."""
        self.index.upsert_fetching(digest, ref, fmt, total, str(access), str(trust))

    def forget_files(self, digest: str, keep: set[str]) -> None:
        """Drop file records of a model that are not in ``keep`` (a re-fetch changed its plan)."""
        self.index.forget_files(digest, keep)

    def install(self, digest: str) -> Path:
        """Build the model's tree from its blobs and rename it into models/, atomically.

        An existing tree (a corrupt model being healed) is swapped out in one step."""
        with self.locked():
            path = self._build_tree(digest)
            self.index.set_installed(digest)
        return path

    def restore_complete(self) -> list[str]:
        """Rebuild every corrupt model whose blobs are all held again (a fetch of another model
        restored a blob they share); return their digests."""
        restored = []
        for row in self.index.models():
            if row.state != ModelState.CORRUPT:
                continue
            files = self.index.model_files(row.digest)
            if files and all(self.has_blob(sha) for _, sha in files):
                self.install(row.digest)
                restored.append(row.digest)
        return restored

    def _build_tree(self, digest: str) -> Path:
        """Install the model's tree. A new tree is built in staging and renamed into place; an
        existing one (a model being healed) is mended in place, never replaced: a pod's bind
        mount holds that very directory, so a replacement would leave it looking at an empty
        or vanished tree."""
        files = self.index.model_files(digest)
        final = self.layout.model(digest)
        if final.is_dir():
            self._heal_tree(final, files)
            return final
        tree = (
            self.layout.staging
            / f"tree-{digest.removeprefix('sha256:')[:16]}-{uuid.uuid4().hex[:8]}"
        )
        tree.mkdir()
        try:
            for rel, sha in files:
                dest = tree / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.layout.blob(sha), dest)
            seal_tree(tree)
            os.rename(tree, final)
            fsync_dir(self.layout.models)
            return final
        except BaseException:
            remove_tree(tree)
            raise

    def _heal_tree(self, tree: Path, files: list[tuple[str, str]]) -> None:
        """Bring an installed tree back to its records in place. An entry that is missing or
        is not its blob's inode is replaced atomically (linked beside it, renamed over it), so
        a reader sees the old name or the healed file, never a gap in what was intact; files
        never damaged keep their inodes, and every open descriptor and mmap of them stays
        good. Entries the model no longer names are removed."""
        opened: dict[Path, None] = {}  # directories made writable, resealed afterwards

        def writable(directory: Path) -> None:
            chain = []
            for d in (directory, *directory.parents):
                chain.append(d)
                if d == tree:
                    break
            for d in reversed(chain):
                if not d.is_dir():
                    d.mkdir(mode=0o755)
                elif d not in opened:
                    os.chmod(d, 0o755)
                opened[d] = None

        wanted = dict(files)
        try:
            for rel, sha in files:
                dest = tree / rel
                blob = self.layout.blob(sha)
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(dest).st_ino == os.stat(blob).st_ino:
                        continue
                writable(dest.parent)
                spare = dest.parent / f".wc-heal-{uuid.uuid4().hex[:8]}"
                os.link(blob, spare)
                os.replace(spare, dest)
            for dirpath, _, filenames in os.walk(tree):
                for name in filenames:
                    path = Path(dirpath) / name
                    if str(path.relative_to(tree)) not in wanted:
                        writable(path.parent)
                        path.unlink()
        finally:
            for d in sorted(opened, key=lambda p: len(p.parts), reverse=True):
                os.chmod(d, 0o555)
                fsync_dir(d)

    def fail(self, digest: str, error: str) -> None:
        row = self.index.model(digest)
        if row is not None and row.state != ModelState.READY:
            self.index.set_state(digest, ModelState.FAILED, error)

    def models(self) -> list[ModelRow]:
        return self.index.models()

    def resolve_cached(self, ref: str) -> str | None:
        """The digest a reference resolved to last time, if any."""
        return self.index.ref_digest(ref)

    def cached_model(self, ref: str) -> ModelRow | None:
        """The record of the model a reference resolved to last time, in whatever state."""
        digest = self.index.ref_digest(ref)
        return self.index.model(digest) if digest else None

    def refs(self) -> list[tuple[str, str]]:
        """Every (reference, digest) this store has resolved."""
        return self.index.refs()

    def remember(self, ref: str, digest: str) -> None:
        self.index.remember_ref(ref, digest)

    def touch(self, digest: str) -> None:
        self.index.touch(digest)

    # -- pins ----------------------------------------------------------------------------------

    def pin(self, digest: str, kind: str, holder: str) -> None:
        """Pin a model (idempotent). ``kind`` is ``mount`` or ``warm``; ``holder`` says who.
        A pin is a use: the model's last-used time moves in the same transaction."""
        self.index.pin(digest, kind, holder)

    def pin_if_ready(self, digest: str, kind: str, holder: str) -> bool:
        """Pin a model only if it is ready, atomically with respect to eviction: once this
        returns True the tree stays until the pin is dropped."""
        with self.locked():
            row = self.index.model(digest)
            if row is None or row.state != ModelState.READY:
                return False
            self.pin(digest, kind, holder)
            return True

    def unpin(self, digest: str, kind: str, holder: str) -> None:
        """Drop a pin; dropping an absent pin is not an error."""
        self.index.unpin(digest, kind, holder)

    def pins(self, digest: str | None = None) -> list[tuple[str, str, str]]:
        return self.index.pins(digest)

    def pins_of(self, holder: str) -> list[Pin]:
        return [Pin(*row) for row in self.index.pins_of(holder)]

    @property
    def models_dir(self) -> Path:
        return self.layout.models

    # -- capacity ------------------------------------------------------------------------------

    def usage(self) -> Usage:
        return measure_usage(self.config, self.layout, self.index)

    def make_room(self, needed: int, keep: str) -> list[str]:
        """Evict least-recently-used unpinned models until ``needed`` more bytes fit under the
        low watermark and above the filesystem's reserve; raise :class:`InsufficientSpace`
        naming the sizes when they cannot."""
        with self.locked():
            usage = self.usage()
            high = int(usage.budget * self.config.high_watermark)
            evicted: list[str] = []
            if usage.used + needed <= high and needed <= usage.room:
                return evicted
            low = int(usage.budget * self.config.low_watermark)
            for row in sorted(self.index.models(), key=lambda r: r.last_used):
                if usage.used + needed <= low and needed <= usage.room:
                    break
                if row.digest == keep or not self._evictable(row):
                    continue
                self._evict(row.digest)
                evicted.append(row.digest)
                usage = self.usage()
            if usage.used + needed > usage.budget or needed > usage.room:
                pinned = sum(r.size for r in self.index.models() if self.index.pins(r.digest))
                raise InsufficientSpace(
                    f"model needs {needed} more bytes; store budget {usage.budget} bytes, "
                    f"{usage.used} in use ({pinned} pinned), {usage.fs_free} free on the "
                    f"filesystem of which {usage.reserve} stay free (the reserve), after "
                    f"evicting {len(evicted)} unpinned model(s)"
                )
            return evicted

    def _evictable(self, row: ModelRow) -> bool:
        if self.index.pins(row.digest):
            return False
        return not self.fetch_lock(row.digest).held_elsewhere()

    def _evict(self, digest: str) -> None:
        log.info("evicting model %s", digest)
        self.evictions += 1
        self.index.forget_model(digest)
        remove_tree(self.layout.model(digest))
        self._drop_orphan_blobs()

    def _drop_orphan_blobs(self) -> None:
        for sha in self.index.orphan_blobs():
            self.index.forget_blob(sha)
            self.layout.blob(sha).unlink(missing_ok=True)

    def gc(self, target_bytes: int | None) -> list[str]:
        """Evict LRU unpinned models until blob bytes <= ``target_bytes`` (default: the low
        watermark of the budget); also drop failed models' partial state."""
        with self.locked():
            self.clean_staging()
            usage = self.usage()
            target = (
                target_bytes
                if target_bytes is not None
                else int(usage.budget * self.config.low_watermark)
            )
            evicted = []
            for row in sorted(self.index.models(), key=lambda r: r.last_used):
                if self.usage().used <= target:
                    break
                if self._evictable(row):
                    self._evict(row.digest)
                    evicted.append(row.digest)
            return evicted

    # -- quarantine ----------------------------------------------------------------------------

    def quarantine(self, digest: str, path: str, sha256: str, reason: str) -> Path:
        """Move a model file that failed a re-check out of the way and mark the model corrupt.

        If the damaged inode is the blob itself, the blob is dropped too (every model that
        shares it becomes corrupt); otherwise only this model's tree entry was replaced."""
        with self.locked():
            tree_file = self.layout.model(digest) / path
            dest = (
                self.layout.quarantine
                / f"{int(time.time())}-{sha256.removeprefix('sha256:')[:16]}-{uuid.uuid4().hex[:6]}"
            )
            blob = self.layout.blob(sha256)
            row = self.index.blob(sha256)
            shared_inode = False
            with contextlib.suppress(FileNotFoundError):
                shared_inode = row is not None and os.stat(blob).st_ino == os.stat(tree_file).st_ino
            parent = tree_file.parent
            moved = False
            if tree_file.exists() or tree_file.is_symlink():
                os.chmod(parent, 0o755)
                try:
                    os.rename(tree_file, dest)
                    moved = True
                finally:
                    os.chmod(parent, 0o555)
            if shared_inode:
                blob.unlink(missing_ok=True)
            self.index.record_quarantine(
                digest, path, sha256, reason, blob_lost=shared_inode or not blob.exists()
            )
            self._trim_quarantine()
            return dest if moved else tree_file

    def quarantined_copy(self, sha256: str) -> Path | None:
        """The most recently quarantined copy of a blob's content, if still kept: a repair
        re-fetches only the chunks of it that are damaged."""
        tag = sha256.removeprefix("sha256:")[:16]
        copies = sorted(
            self.layout.quarantine.glob(f"*-{tag}-*"), key=lambda p: int(p.name.split("-")[0])
        )
        return copies[-1] if copies else None

    def repair_failed(self, digest: str, damage: str, reason: str, error: str, at: float) -> None:
        """Record why a corrupt model could not be repaired: it stays corrupt with its
        ``damage`` (what the check found); installing the model clears the record."""
        self.index.set_repair_failed(digest, damage, reason, error, at)

    def holds_blob_for(self, digest: str, sha256: str) -> bool:
        """Whether ``digest``'s own records name this blob (it was fetched for this model)."""
        return self.index.model_has_blob(digest, sha256)

    def file_sha(self, digest: str, path: str) -> str | None:
        """The sha256 recorded for one file of a model."""
        return self.index.file_sha(digest, path)

    def _trim_quarantine(self) -> None:
        entries = sorted(self.layout.quarantine.iterdir(), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        while entries and total > self.config.quarantine_bytes:
            oldest = entries.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)

    def blob_row(self, sha256: str) -> BlobRow | None:
        return self.index.blob(sha256)

    def record_verification(self, sha256: str, mode: str, ok: bool, detail: str) -> None:
        """Record a check. A passing one replaces the previous passes of its mode (the scrubber
        passes over everything forever; only failures are history worth keeping)."""
        self.index.record_verification(sha256, mode, ok, detail)

    def scrub_order(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """Held blobs that ready models use, least recently verified first, each with the
        (model, path) entries that use it."""
        order: dict[str, list[tuple[str, str]]] = {}
        for sha, model, path in self.index.scrub_rows():
            order.setdefault(sha, []).append((model, path))
        return list(order.items())


class Ingest:
    """One model's way into the store, after containerd's content store: the only path by
    which content becomes a blob and a model becomes ``ready``.

    Held blobs are linked, room is made, a staged file is committed only when its sha256 is
    the one expected (compared here, not by the caller), the tree is installed, and a failure
    is recorded in one place: leaving the ``with`` block by an exception marks the model
    failed with its message. Thread-safe: the transfers of one model commit concurrently."""

    def __init__(self, store: Store, digest: str, ref: str) -> None:
        self._store = store
        self.digest = digest
        self._ref = ref
        self._pending: list[tuple[Path, Fingerprint, str, Callable[[bool], None]]] = []
        self._batch_lock = threading.Lock()

    def __enter__(self) -> Ingest:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.flush()
            return
        self._drop_pending()
        try:
            self._store.fail(self.digest, str(exc))
        except sqlite3.Error as db_exc:  # a full disk may leave no room to say so
            log.error("%s: %s; the index could not record it: %s", self.digest, exc, db_exc)

    def link(self, path: str, sha256: str) -> None:
        """``path`` of this model is the held blob ``sha256`` (the caller has proof)."""
        if self._pending:
            self.flush()  # the blob may be one of the batch: recorded first
        self._store.link_blob(self.digest, path, sha256)

    def make_room(self, needed: int) -> list[str]:
        return self._store.make_room(needed, keep=self.digest)

    def commit(self, staged: Path, fp: Fingerprint, path: str, expected: str | None) -> None:
        """Commit a fsynced staged file as ``path`` of this model. With ``expected`` (the
        digest the source announced), a file that hashed otherwise is dropped and refused
        with :class:`DigestMismatch`; None is for content whose bytes were checked as a whole
        (the members of a tar layer whose digest matched) or that no source digest covers
        (recorded as the model's ``trust``)."""
        if expected is not None and fp.sha256 != expected:
            staged.unlink(missing_ok=True)
            raise DigestMismatch(
                f"{self._ref}: {path} hashes to {fp.sha256}, but the source announced "
                f"{expected}; the download was discarded"
            )
        self._store._commit_blob(staged, fp, self.digest, path)

    def commit_soon(
        self,
        staged: Path,
        fp: Fingerprint,
        path: str,
        expected: str | None,
        done: Callable[[bool], None],
    ) -> None:
        """Like :meth:`commit` for a small file written without its own fsync: it joins the
        current batch, committed when the batch is full, before any :meth:`link` or
        :meth:`install`, or when the ``with`` block ends. ``done(committed)`` is called once
        the batch is committed (True) or dropped by a failure (False): the caller's lock on
        the staged file is held until then, and a dropped file stays where it was (a partial
        resumes from it)."""
        if expected is not None and fp.sha256 != expected:
            staged.unlink(missing_ok=True)
            done(False)
            raise DigestMismatch(
                f"{self._ref}: {path} hashes to {fp.sha256}, but the source announced "
                f"{expected}; the download was discarded"
            )
        with self._batch_lock:
            self._pending.append((staged, fp, path, done))
            if len(self._pending) >= BATCH_FILES:
                self._flush_locked()

    def commit_many(self, entries: Sequence[tuple[Path, Fingerprint, str]]) -> None:
        """Commit staged files written without their own fsync whose bytes were checked as a
        whole (the members of a tar layer whose digest matched), in batches."""
        for start in range(0, len(entries), BATCH_FILES * 16):
            self._store._commit_blobs(entries[start : start + BATCH_FILES * 16], self.digest)

    def flush(self) -> None:
        """Commit the files waiting in the current batch."""
        with self._batch_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self._store._commit_blobs([(s, fp, p) for s, fp, p, _ in pending], self.digest)
        except BaseException:
            for *_, done in pending:
                done(False)
            raise
        for *_, done in pending:
            done(True)

    def _drop_pending(self) -> None:
        with self._batch_lock:
            pending, self._pending = self._pending, []
        for *_, done in pending:
            done(False)

    def install(self, paths: set[str]) -> Path:
        """Keep exactly ``paths`` (a re-fetch may have changed the plan), build the tree and
        rename it into ``models/``: the model is ``ready``."""
        self.flush()
        self._store.forget_files(self.digest, paths)
        return self._store.install(self.digest)


class FetchLock:
    """A per-model flock in staging/ held while a process fetches that model."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> FetchLock:
        # The file exists only while someone holds it: whoever unlocks removes it first, so a
        # waiter that got the lock of a removed file tries again on a fresh one.
        while True:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    return self
            except FileNotFoundError:
                pass
            os.close(self._fd)

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self._fd)

    def held_elsewhere(self) -> bool:
        """True when another process (or another open of the file) holds the lock."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def _remove_if_unlocked(lock_path: Path, *paths: Path) -> bool:
    """Remove ``paths`` if nobody holds the flock of ``lock_path`` (taken while removing)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        for path in paths:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return True
