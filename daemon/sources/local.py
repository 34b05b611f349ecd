"""``file://`` directories: a local tree read as-is.

Symlinks are followed only to regular files inside the directory, or, for a Hugging Face cache
snapshot (``<repo>/snapshots/<revision>``, whose files link into ``<repo>/blobs/``), inside the
cache's repository folder when that whole folder lies under an allowed root (any folder when no
roots are configured: the CLI's operator). Anything else that is not a regular file or
directory is refused.
The model digest is the sha256 of the canonical listing with each file's content sha256, so a
changed file is a different model.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from weightcache.daemon.errors import SourceError, UnsafeContent
from weightcache.daemon.hashing import sha256_file
from weightcache.daemon.plan import ModelPlan, RemoteFile, listing_digest, safe_relpath
from weightcache.daemon.references import FileRef, ModelRef


class LocalSource:
    """Reads models from local directories."""

    def __init__(self, roots: Sequence[Path] = ()) -> None:
        self._roots = tuple(r.resolve() for r in roots)

    def _link_scope(self, real_root: Path) -> Path:
        """Where symlinks of the model directory may point."""
        if real_root.parent.name == "snapshots":
            repo = real_root.parent.parent
            if not self._roots or any(repo.is_relative_to(r) for r in self._roots):
                return repo
        return real_root

    def resolve(self, ref: ModelRef) -> ModelPlan:
        assert isinstance(ref, FileRef)
        root = Path(ref.path)
        try:
            if not stat.S_ISDIR(os.stat(root).st_mode):
                raise SourceError(f"{ref}: not a directory", reason="invalid")
        except FileNotFoundError:
            raise SourceError(f"{ref}: directory does not exist", reason="not_found") from None
        real_root = self._link_scope(root.resolve())
        items: list[RemoteFile] = []
        listing: list[tuple[str, int, str]] = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames) + [
                d for d in dirnames if (Path(dirpath) / d).is_symlink()
            ]:
                full = Path(dirpath) / name
                rel = safe_relpath(str(full.relative_to(root)), what=str(ref))
                target = self._regular_target(ref, real_root, full, rel)
                sha, size = sha256_file(target)
                items.append(RemoteFile(path=rel, size=size, locator=str(target), sha256=sha))
                listing.append((rel, size, sha))
        if not items:
            raise SourceError(f"{ref}: directory holds no files", reason="not_found")
        return ModelPlan(ref=ref, digest=listing_digest(listing), format="file", items=items)

    @staticmethod
    def _regular_target(ref: FileRef, real_root: Path, full: Path, rel: str) -> Path:
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            target = full.resolve()
            if not target.is_relative_to(real_root):
                raise UnsafeContent(f"{ref}: symlink {rel!r} points outside the model directory")
            st = os.stat(target)
            full = target
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeContent(f"{ref}: {rel!r} is not a regular file")
        return full

    def read_into(
        self, ref: ModelRef, locator: str, version: str, start: int, buf: memoryview
    ) -> None:
        try:
            fd = os.open(locator, os.O_RDONLY)
        except FileNotFoundError:
            raise SourceError(f"{ref}: {locator} disappeared", reason="not_found") from None
        try:
            got = 0
            while got < len(buf):
                n = os.preadv(fd, [buf[got:]], start + got)
                if not n:
                    break
                got += n
        finally:
            os.close(fd)
        if got != len(buf):
            raise SourceError(
                f"{ref}: {locator} shrank (wanted {len(buf)} bytes at {start}, got {got})",
                reason="truncated",
            )
