"""Re-checking what the store holds: fast (size, mtime, inode) or full (xxh3 of every chunk).

Checks the model trees, which is what pods see, against the blob records. A mismatch is
quarantined and the model marked corrupt; nothing corrupt is left where a new mount could read it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from weightcache.daemon.hashing import chunk_xxh3
from weightcache.daemon.store.index import BlobRow
from weightcache.daemon.store.store import CORRUPT, READY, Store


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


def check_file(path: str, blob: BlobRow, full: bool) -> tuple[str | None, tuple[int, ...], int]:
    """Check one tree file against its blob; return (reason or None, bad chunks, bytes hashed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "file is missing", (), 0
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", (), 0
    if st.st_size != blob.size:
        return f"size {st.st_size} != {blob.size}", (), 0
    if not full:
        if st.st_ino != blob.inode:
            return "inode changed (file replaced)", (), 0
        if st.st_mtime_ns != blob.mtime_ns:
            return "mtime changed (file rewritten)", (), 0
        return None, (), 0
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


def verify_store(store: Store, *, full: bool, quarantine: bool = True) -> VerifyReport:
    report = VerifyReport(mode="full" if full else "fast")
    for row in store.models():
        if row.state == CORRUPT:
            report.corrupt_models.append(row.digest)
        if row.state not in (READY, CORRUPT):
            continue
        report.models += 1
        tree = store.model_path(row.digest)
        for rel, sha in store.index.model_files(row.digest):
            blob = store.blob_row(sha)
            report.files += 1
            path = str(tree / rel)
            if blob is None or blob.state != "ok":
                report.problems.append(Problem(row.digest, rel, sha, "blob is not held"))
                continue
            reason, bad, hashed = check_file(path, blob, full)
            report.bytes_hashed += hashed
            if reason is None:
                store.record_verification(sha, report.mode, True, "")
                continue
            report.problems.append(Problem(row.digest, rel, sha, reason, bad))
            if quarantine:
                store.quarantine(row.digest, rel, sha, reason)
        after = store.model(row.digest)
        if after is not None and after.state == CORRUPT and row.digest not in report.corrupt_models:
            report.corrupt_models.append(row.digest)
    return report
