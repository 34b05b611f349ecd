"""The fetch pipeline: resolve, make room, download in parallel, verify, install.

- One fetch per model however many callers ask: callers in this process join the same future;
  other processes wait on the model's fetch lock and then find it ready.
- Files download in parallel; large files in parallel ranges. Each file's parts are written and
  hashed in order by one thread (sha256 needs order), with at most ``ranges_per_file`` parts in
  memory per file, so memory is bounded by files x ranges x part size.
- Partial files resume after a crash (see :mod:`weightcache.daemon.store.staging`).
- Retries follow ``FetchConfig.retry_delays``; an optional token bucket caps the node's rate.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import io
import logging
import mmap
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from weightcache.daemon.config import FetchConfig
from weightcache.daemon.errors import (
    DigestMismatch,
    InsufficientSpace,
    NotCached,
    SourceError,
    UnsafeContent,
    WeightcacheError,
    public_message,
)
from weightcache.daemon.hashing import Fingerprint, StreamHasher, chunk_xxh3
from weightcache.daemon.metrics import Metrics
from weightcache.daemon.plan import ModelPlan, RemoteArchive, RemoteFile
from weightcache.daemon.ratelimit import RateLimiter
from weightcache.daemon.references import ModelRef, OciRef, parse_reference
from weightcache.daemon.retry import with_retries
from weightcache.daemon.signing import SignatureCheck
from weightcache.daemon.sources import Sources
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.staging import DIRECT_MIN, stage_stream
from weightcache.daemon.store.states import Access, ModelState, Trust
from weightcache.daemon.store.store import Ingest, Store
from weightcache.daemon.store.tarsafe import (
    LayerTree,
    TreeBuilder,
    merge,
    open_decompressed,
    unpack,
)
from weightcache.daemon.transfer import PartStream, ordered_parts

log = logging.getLogger(__name__)

MODELS_AT_ONCE = 4
"""Models fetched at the same time; more wait for one of them to finish."""
ARCHIVE_EXPANSION = 3
"""Compressed tar layers are assumed to expand up to this much when checking capacity."""
TAR_READ = 4 * 1024 * 1024
SMALL_FILE = DIRECT_MIN
"""Raw files below this size commit in batches (:meth:`Ingest.commit_soon`)."""


@dataclass
class Progress:
    """Bytes done of total for one model fetch; thread-safe counters."""

    digest: str
    ref: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    last_error: str = ""
    """The last retried failure, in full (the operator's view: ``ls``, the agent's log)."""
    last_error_public: str = ""
    """The same in words a tenant may read (:func:`public_message`)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def failed(self, exc: BaseException) -> None:
        self.last_error = str(exc)
        self.last_error_public = public_message(exc)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None


ProgressCallback = Callable[[Progress], None]


def failure_reason(exc: BaseException) -> str:
    """A short stable label for a failed fetch."""
    if isinstance(exc, SourceError):
        return exc.reason
    if isinstance(exc, InsufficientSpace):
        return "no_space"
    if isinstance(exc, DigestMismatch):
        return "digest"
    if isinstance(exc, WeightcacheError):
        return "invalid"
    return "io"


def _space_needed(todo: list[RemoteFile | RemoteArchive]) -> int:
    """Bytes the items will take in the store; compressed layers may expand."""
    return sum(
        i.size
        * (ARCHIVE_EXPANSION if isinstance(i, RemoteArchive) and i.compression != "none" else 1)
        for i in todo
    )


class Fetcher:
    """Fetches models into a store. Thread-safe; share one per process."""

    def __init__(
        self,
        store: Store,
        sources: Sources,
        config: FetchConfig,
        *,
        stop: threading.Event | None = None,
        on_progress: ProgressCallback | None = None,
        metrics: Metrics | None = None,
        signatures: SignatureCheck | None = None,
    ) -> None:
        """``signatures`` verifies a model's signature before it is installed (and refuses it
        by raising); None checks none."""
        self.store = store
        self.signatures = signatures
        self.metrics = metrics or Metrics()
        self.sources = sources
        self.config = config
        self.stop = stop or threading.Event()
        self._on_progress = on_progress
        self._limiter = RateLimiter(config.bandwidth_bytes_per_s, self.stop)
        # Each model fetched at once gets its own files_in_parallel file workers (and their
        # range workers): a slow or stalling source holds only its own model's workers, never
        # another model's. Memory is models x files x ranges x part size at most.
        self._models = ThreadPoolExecutor(max_workers=MODELS_AT_ONCE, thread_name_prefix="wc-model")
        self._files = ThreadPoolExecutor(
            max_workers=MODELS_AT_ONCE * config.files_in_parallel, thread_name_prefix="wc-file"
        )
        self._ranges = ThreadPoolExecutor(
            max_workers=MODELS_AT_ONCE * config.files_in_parallel * config.ranges_per_file,
            thread_name_prefix="wc-range",
        )
        self._local = threading.local()
        self._inflight: dict[str, Future[ModelRow]] = {}
        self._progress: dict[str, Progress] = {}
        self._lock = threading.Lock()
        self.repaired_bytes = 0
        """Bytes fetched to repair files by range (the rest of those files was kept)."""

    def close(self) -> None:
        self.stop.set()
        for pool in (self._models, self._files, self._ranges):
            pool.shutdown(wait=True, cancel_futures=True)

    # -- public --------------------------------------------------------------------------------

    def warm(self, ref: ModelRef) -> ModelRow:
        """Fetch ``ref`` into the store (or find it there); return its ready record."""
        return self.warm_async(ref).result()

    def warm_async(
        self, ref: ModelRef, admit: Callable[[ModelPlan], None] | None = None
    ) -> Future[ModelRow]:
        """Start (or join) the fetch of ``ref``. ``admit`` sees the resolved plan before any
        content is fetched and refuses it by raising (a quota); a model already held, or a
        fetch already running, is joined without asking it."""
        return self._single_flight(str(ref), lambda: self._warm(ref, admit))

    def refetch_async(self, digest: str) -> Future[ModelRow]:
        """Start (or join) a fetch of a held model's content again: by digest, from the source
        it came from; files with a quarantined copy fetch only their damaged chunks. The
        repairer (:mod:`weightcache.daemon.repair`) decides when, and records the outcome."""
        return self._single_flight(f"refetch {digest}", lambda: self._refetch(digest))

    def _single_flight(self, key: str, work: Callable[[], ModelRow]) -> Future[ModelRow]:
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut
            fut = self._models.submit(work)
            self._inflight[key] = fut
        # Outside the lock: a fetch that already finished runs the callback right here.
        fut.add_done_callback(lambda done: self._forget(key, done))
        return fut

    def progress(self, digest: str) -> Progress | None:
        return self._progress.get(digest)

    def _forget(self, key: str, fut: Future[ModelRow]) -> None:
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    # -- one model -----------------------------------------------------------------------------

    def resolve(self, ref: ModelRef) -> ModelPlan:
        source = self.sources.for_ref(ref)
        return with_retries(
            lambda: source.resolve(ref),
            self.config.retry_delays,
            what=f"resolve {ref}",
            stop=self.stop,
        )

    def _warm(self, ref: ModelRef, admit: Callable[[ModelPlan], None] | None) -> ModelRow:
        plan = self.resolve(ref)
        self._check_served_by(plan)
        self.store.remember(str(ref), plan.digest)
        row = self._held(plan.digest)
        if row is not None:
            return row
        if admit is not None:
            admit(plan)
        with self.store.fetch_lock(plan.digest):
            # Checked again under the lock: another process may have finished it meanwhile.
            return self._held(plan.digest) or self._fetch(plan)

    def _refetch(self, digest: str) -> ModelRow:
        row = self.store.model(digest)
        if row is None:
            raise NotCached(f"model {digest} is not in the store")
        if row.state == ModelState.READY:
            return row
        ref = parse_reference(row.ref)
        if isinstance(ref, OciRef):
            ref = ref.with_digest(digest)  # the tag may have moved on; the bytes have not
        plan = self.resolve(ref)
        if plan.digest != digest:
            raise SourceError(
                f"{row.ref} now resolves to {plan.digest}, not {digest}: the source no "
                "longer holds this model's content",
                reason="changed",
            )
        with self.store.fetch_lock(digest):
            return self._held(digest) or self._fetch(plan)

    def _check_served_by(self, plan: ModelPlan) -> None:
        """A model already held, reached through a repository that never served it, is that
        repository's only if it shows it holds every blob (a registry can serve another
        repository's manifest under its own name). Raises :class:`UnsafeContent` otherwise."""
        if not isinstance(plan.ref, OciRef) or self.store.model(plan.digest) is None:
            return
        repository = (plan.ref.registry, plan.ref.repository)
        for known, digest in self.store.refs():
            if digest != plan.digest:
                continue
            with contextlib.suppress(WeightcacheError):
                other = parse_reference(known)
                if isinstance(other, OciRef) and (other.registry, other.repository) == repository:
                    return  # this repository served it before
        provenance = self.sources.provenance(plan.ref)
        for item in plan.items:
            if item.sha256 is None or not provenance.holds(plan.ref, item.sha256, item.size):
                raise UnsafeContent(
                    f"{plan.ref} names model {plan.digest}, which this node holds from another "
                    f"repository, but {plan.ref.repository} does not show it holds "
                    f"{item.sha256 or item.locator}; refused"
                )

    def _held(self, digest: str) -> ModelRow | None:
        """The model's record if it is ready (marking it used), else None."""
        row = self.store.model(digest)
        if row is None or row.state != ModelState.READY:
            return None
        self.store.touch(digest)
        return row

    def _access(self, plan: ModelPlan) -> Access:
        public = self.sources.provenance(plan.ref).anonymous(plan.ref, plan.digest)
        return Access.ANONYMOUS if public else Access.CREDENTIALS

    def _reusable(self, plan: ModelPlan, item: RemoteFile) -> str | None:
        """The sha256 of a held blob this item may be linked to without a download, or None.

        This model's own record of the path is enough (a source that announces no digest, S3
        or local, still names an immutable version in the plan digest). A digest the manifest
        merely names is not: the blob may belong to another tenant's model, so the source
        must show the requesting repository holds it, at the declared size."""
        own = self.store.file_sha(plan.digest, item.path)
        if own and item.sha256 in (None, own) and self.store.has_blob(own):
            return own
        sha = item.sha256
        if not sha or not self.store.has_blob(sha):
            return None
        blob = self.store.blob_row(sha)
        if blob is None or blob.size != item.size:
            log.warning(
                "%s: %s declares %d bytes for %s, the held blob has %s: fetching it",
                plan.ref,
                item.path,
                item.size,
                sha,
                blob.size if blob else None,
            )
            return None
        if self.store.holds_blob_for(plan.digest, sha):
            return sha
        if not self.sources.provenance(plan.ref).holds(plan.ref, sha, item.size):
            log.info("%s: no proof the repository holds %s; fetching it", plan.ref, sha)
            return None
        return sha

    def _fetch(self, plan: ModelPlan) -> ModelRow:
        trust = (
            Trust.FIRST_FETCH
            if any(isinstance(i, RemoteFile) and i.trusted_on_first_fetch for i in plan.items)
            else Trust.DIGEST
        )
        progress = Progress(plan.digest, str(plan.ref), plan.total_bytes)
        self._progress[plan.digest] = progress
        try:
            with self.store.ingest(
                plan.digest,
                str(plan.ref),
                plan.format,
                plan.total_bytes,
                self._access(plan),
                trust,
            ) as ingest:
                try:
                    self._ingest(plan, ingest, progress)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    self._discard_partials(plan)  # first: the index needs room to record it
                    raise InsufficientSpace(
                        f"disk full while fetching {plan.ref}: {exc.strerror}"
                    ) from exc
        except (WeightcacheError, OSError) as exc:
            progress.failed(exc)
            self.metrics.fetch_failures.labels(failure_reason(exc)).inc()
            raise
        finally:
            self._report(progress, final=True)
        restored = self.store.restore_complete()
        for other in restored:
            log.info("model %s restored: a blob it shares was fetched again", other)
        row = self.store.model(plan.digest)
        assert row is not None
        took = time.monotonic() - progress.started
        self.metrics.fetch_duration.observe(took)
        log.info("model %s ready: %d bytes in %.2fs", plan.digest, plan.total_bytes, took)
        return row

    def _ingest(self, plan: ModelPlan, ingest: Ingest, progress: Progress) -> None:
        todo: list[RemoteFile | RemoteArchive] = []
        for item in plan.items:
            sha = self._reusable(plan, item) if isinstance(item, RemoteFile) else None
            if isinstance(item, RemoteFile) and sha is not None:
                ingest.link(item.path, sha)
                progress.add(item.size)
            else:
                todo.append(item)
        ingest.make_room(_space_needed(todo))
        layers = self._transfer(plan, ingest, todo, progress)
        keep = {i.path for i in plan.items if isinstance(i, RemoteFile)}
        if layers:
            tree = TreeBuilder(
                allow_override=any(isinstance(i, RemoteArchive) and i.whiteouts for i in plan.items)
            )
            for layer in layers:  # manifest order: image layers override earlier ones
                merge(tree, layer, f"{plan.ref}")
            for path, sha in tree.files.items():
                ingest.link(path, sha)
            keep |= set(tree.files)
        ingest.flush()  # every file in the index: what the signature is checked against
        if self.signatures is not None:
            self.signatures.verify_fetch(plan.ref, plan.digest, keep)
        ingest.install(keep)

    def _transfer(
        self,
        plan: ModelPlan,
        ingest: Ingest,
        todo: list[RemoteFile | RemoteArchive],
        progress: Progress,
    ) -> list[LayerTree]:
        """Fetch every item in parallel; return the archives' layers in manifest order."""
        stop = threading.Event()
        # Two paths with the same content are downloaded once and linked twice.
        unique: dict[str, RemoteFile] = {}
        aliases: list[tuple[RemoteFile, RemoteFile]] = []
        for f in (i for i in todo if isinstance(i, RemoteFile)):
            first = unique.setdefault(f.staging_key, f)
            if first is not f:
                aliases.append((f, first))
        jobs = _JobQueue(self._files, self.config.files_in_parallel, stop)
        files = {
            key: jobs.submit(functools.partial(self._fetch_file, plan, ingest, f, progress, stop))
            for key, f in unique.items()
        }
        archives = [
            jobs.submit(functools.partial(self._fetch_archive, plan, ingest, a, progress, stop))
            for a in todo
            if isinstance(a, RemoteArchive)
        ]
        jobs.start()
        transfers: list[Future[Any]] = [*files.values(), *archives]
        done, _ = wait(transfers, return_when=FIRST_EXCEPTION)
        failures = [e for f in done if not f.cancelled() and (e := f.exception())]
        if failures:
            # Stop the other transfers and let them finish before reporting: no thread may
            # still write into staging once the failure is out. Report the cause, not a
            # transfer that was cancelled because of it.
            stop.set()
            for fut in transfers:
                fut.cancel()
            wait(transfers)
            failures += [
                e for f in transfers if f not in done and not f.cancelled() and (e := f.exception())
            ]
            raise next((e for e in failures if not isinstance(e, InterruptedError)), failures[0])
        shas = {key: fut.result() for key, fut in files.items()}
        for alias, first in aliases:
            ingest.link(alias.path, shas[first.staging_key])
            progress.add(alias.size)
        return [fut.result() for fut in archives]

    def _discard_partials(self, plan: ModelPlan) -> None:
        for item in plan.items:
            self.store.partial(item.staging_key, item.size, self.config.part_bytes).discard()

    # -- one object ----------------------------------------------------------------------------

    def _parts(
        self,
        plan: ModelPlan,
        locator: str,
        version: str,
        size: int,
        offset: int,
        progress: Progress,
        stop: threading.Event,
    ) -> Generator[memoryview, None, None]:
        """The object's bytes from ``offset``, in order, through this thread's buffers."""

        def read_into(start: int, view: memoryview) -> None:
            self._read_range(plan, locator, version, start, view, progress, stop)

        for view in ordered_parts(
            read_into, size, offset, self.config.part_bytes, self._buffers(), self._ranges, stop
        ):
            yield view
            progress.add(len(view))
            self._report(progress)

    def _read_range(
        self,
        plan: ModelPlan,
        locator: str,
        version: str,
        start: int,
        view: memoryview,
        progress: Progress,
        stop: threading.Event,
    ) -> None:
        """Fill ``view`` from ``start`` of one object, within the bandwidth cap, with retries."""
        source = self.sources.for_ref(plan.ref)
        fetched = self.metrics.fetch_bytes.labels(plan.ref.scheme)

        def attempt() -> None:
            if stop.is_set() or self.stop.is_set():
                raise InterruptedError("fetch cancelled")
            self._limiter.consume(len(view))
            source.read_into(plan.ref, locator, version, start, view)
            fetched.inc(len(view))

        def note(exc: Exception) -> None:
            progress.failed(exc)

        with_retries(
            attempt,
            self.config.retry_delays,
            what=f"{plan.ref} {locator} @{start}",
            stop=self.stop,
            on_retry=note,
        )

    def _buffers(self) -> list[mmap.mmap]:
        """This file thread's read buffers, allocated once and reused for every part. They are
        anonymous mmaps, so page-aligned, as direct writes need."""
        bufs: list[mmap.mmap] | None = getattr(self._local, "buffers", None)
        if bufs is None:
            count, size = self.config.ranges_per_file, self.config.part_bytes
            bufs = [mmap.mmap(-1, size) for _ in range(count)]
            self._local.buffers = bufs
        return bufs

    def _member_buffer(self) -> mmap.mmap:
        buf: mmap.mmap | None = getattr(self._local, "member_buffer", None)
        if buf is None:
            buf = self._local.member_buffer = mmap.mmap(-1, self.config.part_bytes)
        return buf

    def _fetch_file(
        self,
        plan: ModelPlan,
        ingest: Ingest,
        item: RemoteFile,
        progress: Progress,
        stop: threading.Event,
    ) -> str:
        """Download one file into its partial (resuming), verify it, commit it; its sha256."""
        part = self.config.part_bytes
        hasher = StreamHasher(chunk_size=part)
        partial = self.store.partial(item.staging_key, item.size, part)
        partial.on_wait = ingest.flush  # see PartialFile._lock
        with contextlib.ExitStack() as held_open:
            held_open.enter_context(partial)
            held = self._reusable(plan, item)
            if held is not None:
                # Another model's fetch committed the same content while we waited for it.
                ingest.link(item.path, held)
                progress.add(item.size)
                partial.discard()
                return held
            known = item.sha256 or self.store.file_sha(plan.digest, item.path)
            repaired = known and self._repair_by_range(plan, ingest, item, known, progress, stop)
            if repaired:
                partial.discard()
                return repaired
            # Without a sha256 to compare, an announced MD5 (a single-part S3 ETag) is checked.
            md5 = hashlib.md5(usedforsecurity=False) if item.sha256 is None and item.md5 else None
            offset = partial.resume(hasher, md5.update if md5 else None)
            progress.add(offset)
            position = offset
            for view in self._parts(
                plan, item.locator, item.version, item.size, offset, progress, stop
            ):
                partial.write(position, view)
                partial.record_chunks(hasher.update(view))
                if md5 is not None:
                    md5.update(view)
                position += len(view)
            fp = hasher.finish()
            if md5 is not None and md5.hexdigest() != item.md5:
                partial.discard()
                raise DigestMismatch(
                    f"{plan.ref}: {item.path} has MD5 {md5.hexdigest()}, but the source "
                    f"announced {item.md5}; the download was discarded"
                )
            if item.size % part:
                partial.record_chunks([fp.chunk_digest(fp.chunk_count - 1)])
            if item.size < SMALL_FILE:
                # Committed with its batch (one filesystem sync and one index transaction for
                # many small files), still under the partial's lock, which is held until then.
                partial.release_io()
                keep_locked = held_open.pop_all()

                def done(committed: bool) -> None:
                    if committed:
                        partial.forget_log()
                    keep_locked.close()

                ingest.commit_soon(partial.path, fp, item.path, item.sha256, done)
                return fp.sha256
            partial.fsync()
            # Verified (by the store, against the announced digest) and committed under the
            # partial's lock, so a second writer waiting for it finds either the partial as it
            # was or the committed blob, never a half-way. The chunk log goes only once the
            # blob is recorded: a crash before that resumes from the whole partial.
            ingest.commit(partial.path, fp, item.path, expected=item.sha256)
            partial.forget_log()
        return fp.sha256

    def _repair_by_range(
        self,
        plan: ModelPlan,
        ingest: Ingest,
        item: RemoteFile,
        sha: str,
        progress: Progress,
        stop: threading.Event,
    ) -> str | None:
        """Heal a file from its quarantined copy: fetch only the chunks whose xxh3 differs from
        the record (a truncated copy's tail counts as differing), check each fetched chunk, then
        the whole file's sha256, and commit. None when there is no usable copy or anything
        disagrees: the caller downloads the whole file instead."""
        blob = self.store.blob_row(sha)
        if blob is None or blob.size != item.size:
            return None  # a first download: nothing was ever held to repair from
        copy = self.store.quarantined_copy(sha)
        if copy is None:
            return None
        size, chunk = item.size, blob.chunk_size
        tmp = self.store.temp_path("repair")
        fetched = 0
        try:
            shutil.copyfile(copy, tmp)
            with open(tmp, "r+b", buffering=0) as f:
                fd = f.fileno()
                os.ftruncate(fd, size)
                for i in range(len(blob.chunks) // 16):
                    start, want = i * chunk, blob.chunks[i * 16 : (i + 1) * 16]
                    length = min(chunk, size - start)
                    if chunk_xxh3(os.pread(fd, length, start)) == want:
                        continue
                    view = memoryview(bytearray(length))
                    self._read_range(plan, item.locator, item.version, start, view, progress, stop)
                    if chunk_xxh3(view) != want:
                        raise DigestMismatch(f"{item.path} chunk {i} from the source differs")
                    os.pwrite(fd, view, start)
                    fetched += length
                os.fsync(fd)
            hasher = StreamHasher(chunk_size=chunk)
            with open(tmp, "rb") as f:
                while data := f.read(chunk):
                    hasher.update(data)
            fp = hasher.finish()
            if fp.sha256 != sha:
                log.warning("%s: %s did not repair by range; downloading it", plan.ref, item.path)
                return None
            ingest.commit(tmp, fp, item.path, expected=sha)
        except (WeightcacheError, OSError) as exc:
            log.warning(
                "%s: repairing %s by range failed (%s); downloading it", plan.ref, item.path, exc
            )
            return None
        finally:
            tmp.unlink(missing_ok=True)
        progress.add(size)
        self.repaired_bytes += fetched
        self.metrics.repair_bytes.inc(fetched)
        log.info(
            "%s: %s repaired by range: %d of %d bytes fetched", plan.ref, item.path, fetched, size
        )
        return sha

    def _fetch_archive(
        self,
        plan: ModelPlan,
        ingest: Ingest,
        item: RemoteArchive,
        progress: Progress,
        stop: threading.Event,
    ) -> LayerTree:
        """Stream a tar layer from the source straight into staged member files, hashing the
        layer on the way; commit the members only once the layer's digest checks out.

        One network pass and one disk write per byte. A crash restarts the layer (raw-file
        formats resume per chunk)."""
        layer_hash = hashlib.sha256()
        parts = self._parts(plan, item.locator, "", item.size, 0, progress, stop)
        stream = PartStream(parts, layer_hash.update)
        staged: dict[str, tuple[Path, Fingerprint]] = {}
        usage = self.store.usage()
        max_bytes = max(0, min(usage.budget - usage.used, usage.fs_free))
        where = f"{plan.ref} layer {item.sha256}"

        def write(rel: str, reader: IO[bytes], size: int) -> str:
            tmp = self.store.temp_path("member")
            # No fsync per member: the batches commit_many makes sync the filesystem once.
            fp = stage_stream(
                tmp, reader, size, self._member_buffer(), self.config.part_bytes, fsync=False
            )
            old = staged.pop(rel, None)
            if old is not None:
                old[0].unlink(missing_ok=True)
            staged[rel] = (tmp, fp)
            return fp.sha256

        try:
            raw = io.BufferedReader(stream, buffer_size=TAR_READ)
            layer = unpack(
                open_decompressed(raw, item.compression),
                write,
                root=item.root,
                whiteouts=item.whiteouts,
                where=where,
                max_bytes=max_bytes,
                max_members=self.config.max_layer_members,
            )
            stream.drain()
            digest = "sha256:" + layer_hash.hexdigest()
            if digest != item.sha256:
                raise DigestMismatch(
                    f"{plan.ref}: layer hashes to {digest}, but the manifest says "
                    f"{item.sha256}; its unpacked files were discarded"
                )
            # The layer's digest matched: every member is checked.
            ingest.commit_many([(tmp, fp, rel) for rel, (tmp, fp) in staged.items()])
            staged.clear()
            return layer
        finally:
            parts.close()
            for tmp, _ in staged.values():
                tmp.unlink(missing_ok=True)

    # -- progress ------------------------------------------------------------------------------

    _last_report: float = 0.0

    def _report(self, progress: Progress, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_report < 0.5:
            return
        self._last_report = now
        try:
            self.store.index.set_progress(
                progress.digest, progress.done, progress.total, progress.rate, progress.last_error
            )
        except sqlite3.Error as exc:  # progress is best effort; a full disk must not mask the cause
            log.warning("could not record progress of %s: %s", progress.digest, exc)
        if self._on_progress is not None:
            self._on_progress(progress)


class _JobQueue:
    """One model's transfers, run by at most ``workers`` threads of a shared pool: the pool is
    sized for several models, and each model's own workers pull its jobs in order."""

    def __init__(self, pool: ThreadPoolExecutor, workers: int, stop: threading.Event) -> None:
        self._pool = pool
        self._workers = workers
        self._stop = stop
        self._jobs: collections.deque[tuple[Future[Any], Callable[[], Any]]] = collections.deque()
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        self._jobs.append((fut, job))
        return fut

    def start(self) -> None:
        for _ in range(min(self._workers, len(self._jobs))):
            try:
                worker = self._pool.submit(self._work)
            except RuntimeError:  # the fetcher is closing
                self._cancel_all()
                return
            # A worker cancelled by the pool's shutdown leaves no job waiting forever.
            worker.add_done_callback(self._after_worker)

    def _after_worker(self, worker: Future[None]) -> None:
        if worker.cancelled():
            self._cancel_all()

    def _cancel_all(self) -> None:
        with self._lock:
            jobs, self._jobs = list(self._jobs), collections.deque()
        for fut, _ in jobs:
            fut.cancel()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    return
                fut, job = self._jobs.popleft()
            if self._stop.is_set():
                fut.cancel()
            if not fut.set_running_or_notify_cancel():
                continue  # cancelled: a transfer of this model failed
            try:
                fut.set_result(job())
            except BaseException as exc:
                fut.set_exception(exc)
