"""Where things live in the store directory, and the small filesystem helpers the store needs.

```
index.sqlite3            the index (WAL)
blobs/sha256/AB/ABCD...  immutable content named by sha256, mode 0444
models/<hex>/            a model's tree of hard links into blobs/, directories 0555
staging/                 downloads in progress (resumable) and trees being built
quarantine/              files that failed a re-check
```
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def index(self) -> Path:
        return self.root / "index.sqlite3"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def blob(self, sha256: str) -> Path:
        hexd = sha256.removeprefix("sha256:")
        return self.blobs / hexd[:2] / hexd

    def model(self, digest: str) -> Path:
        return self.models / digest.removeprefix("sha256:")

    def create(self) -> None:
        for d in (self.blobs, self.models, self.staging, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def sync_filesystem(path: Path) -> None:
    """syncfs(2) of the filesystem holding ``path``: every file written and every directory
    entry made there so far is durable when it returns. One call stands for the fsyncs of a
    whole batch of small files (each of which would otherwise wait for its own journal
    commit)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def make_writable_tree(path: Path) -> None:
    """Give the owner write permission on every directory under ``path`` (for removal)."""
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    if path.is_dir() and not path.is_symlink():
        os.chmod(path, 0o755)


def remove_tree(path: Path) -> None:
    """Remove a (possibly read-only) tree; a missing tree is not an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        make_writable_tree(path)
        shutil.rmtree(path, ignore_errors=False)
    else:
        path.unlink(missing_ok=True)


def seal_tree(path: Path) -> None:
    """Make every directory 0555 (bottom-up) and fsync it."""
    for dirpath, _, _ in os.walk(path, topdown=False):
        os.chmod(dirpath, 0o555)
        fsync_dir(Path(dirpath))


def dir_bytes(path: os.PathLike[str] | str) -> int:
    """Disk blocks taken by the regular files directly in ``path`` (0 when it is gone)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            continue
    return total
