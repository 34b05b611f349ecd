"""Re-checking what the store holds: fast (size, mtime, inode) or full (xxh3 of every chunk).

Checks the model trees, which is what pods see, against the blob records, and return what they
find: what to do about a problem (quarantine, mark, repair) is the repairer's
(:mod:`weightcache.daemon.repair`), never a side effect of looking.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from weightcache.daemon.hashing import chunk_xxh3
from weightcache.daemon.store.index import BlobRow
from weightcache.daemon.store.states import BlobState, ModelState
from weightcache.daemon.store.store import Store


@dataclass(frozen=True)
class Problem:
    model: str
    path: str
    sha256: str
    reason: str
    bad_chunks: tuple[int, ...] = ()


@dataclass
class VerifyReport:
    mode: str
    models: int = 0
    files: int = 0
    bytes_hashed: int = 0
    problems: list[Problem] = field(default_factory=list)
    corrupt_models: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.corrupt_models


def check_content(path: str, blob: BlobRow) -> tuple[str | None, tuple[int, ...], int]:
    """The full check of one tree file: type, size, then the xxh3 of every chunk (bit rot,
    which leaves the metadata alone). Returns (reason or None, bad chunks, bytes hashed)."""
    reason = _shape_problem(_lstat(path), blob.size)
    if reason is not None:
        return reason, (), 0
    bad: list[int] = []
    hashed = 0
    with open(path, "rb", buffering=0) as f:
        for i in range(len(blob.chunks) // 16):
            data = f.read(blob.chunk_size)
            hashed += len(data)
            if chunk_xxh3(data) != blob.chunks[i * 16 : (i + 1) * 16]:
                bad.append(i)
    if bad:
        return f"content differs in {len(bad)} chunk(s)", tuple(bad), hashed
    return None, (), hashed


@dataclass
class ModelCheck:
    files: int = 0
    bytes_hashed: int = 0
    problems: list[Problem] = field(default_factory=list)


def check_model(store: Store, digest: str, *, full: bool, remembered: bool = False) -> ModelCheck:
    """Check every file of one model; return the problems found.

    With ``remembered``, a full check skips re-hashing files whose last full re-hash passed and
    whose metadata has not changed since (publish uses this; ``weightcache verify`` does not).
    Only full results are recorded: they are what the remembered check and the scrubber read.
    """
    check = ModelCheck()
    tree = str(store.model_path(digest))
    for rec in store.index.model_file_records(digest):
        check.files += 1
        path = os.path.join(tree, rec.path)
        if rec.state != BlobState.OK:
            check.problems.append(Problem(digest, rec.path, rec.sha256, "blob is not held"))
            continue
        reason = metadata_problem(path, rec.size or 0, rec.inode or 0, rec.mtime_ns or 0)
        bad: tuple[int, ...] = ()
        unchanged = reason is None
        if full and not (unchanged and remembered and store.index.fully_verified(rec.sha256)):
            # Full mode judges content alone: a touched or copied file with the right bytes
            # is fine (it is re-hashed every time, as its metadata no longer matches).
            blob = store.blob_row(rec.sha256)
            if blob is None:
                reason = "blob is not held"
            else:
                reason, bad, hashed = check_content(path, blob)
                check.bytes_hashed += hashed
            if reason is None and unchanged:
                store.record_verification(rec.sha256, "full", True, "")
        if reason is None:
            continue
        check.problems.append(Problem(digest, rec.path, rec.sha256, reason, bad))
    return check


def metadata_problem(path: str, size: int, inode: int, mtime_ns: int) -> str | None:
    """The fast check (type, size, inode, mtime) of one file against its blob record; runs
    per file at every publish, so it is one lstat and a few comparisons."""
    st = _lstat(path)
    reason = _shape_problem(st, size)
    if reason is not None or st is None:
        return reason
    if st.st_ino != inode:
        return "inode changed (file replaced)"
    if st.st_mtime_ns != mtime_ns:
        return "mtime changed (file rewritten)"
    return None


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _shape_problem(st: os.stat_result | None, size: int) -> str | None:
    """What both checks refuse before anything else: a missing, odd or wrongly sized file."""
    if st is None:
        return "file is missing"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size != size:
        return f"size {st.st_size} != {size}"
    return None


def verify_store(
    store: Store, *, full: bool, damaged: Callable[[Sequence[Problem]], object] | None = None
) -> VerifyReport:
    """Check every installed model; each model's problems go to ``damaged`` (the repairer)
    before the next model is checked. ``corrupt_models`` is read afterwards."""
    report = VerifyReport(mode="full" if full else "fast")
    for row in store.models():
        if row.state not in (ModelState.READY, ModelState.CORRUPT):
            continue
        report.models += 1
        check = check_model(store, row.digest, full=full)
        report.files += check.files
        report.bytes_hashed += check.bytes_hashed
        report.problems += check.problems
        if check.problems and damaged is not None:
            damaged(check.problems)
    found = {p.model for p in report.problems}
    report.corrupt_models = [
        row.digest
        for row in store.models()
        if row.state == ModelState.CORRUPT or row.digest in found
    ]
    return report
