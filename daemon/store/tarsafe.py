"""Safe unpacking of tar layers into a model tree.

Accepted: regular files and directories whose normalised path stays inside the tree.
Links inside the tree are handled deliberately: a hard link or a symlink that resolves, within
the tree, to a regular file becomes a second name for the same content (the same blob, so the
tree holds only regular files and directories); a link that leaves the tree, dangles, or names a
directory is refused. Absolute paths, ``..`` segments, devices, FIFOs and sparse members are
refused. Image layers apply ``.wh.`` whiteouts and may override earlier layers; other formats
refuse a path that appears twice.
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import zstandard

from weightcache.daemon.errors import UnsafeContent, UnsupportedManifest
from weightcache.daemon.plan import Compression, safe_relpath

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

FileWriter = Callable[[str, IO[bytes], int], str]
"""Writes one member's bytes (path, reader, size) into the store; returns its sha256."""


@dataclass
class TreeBuilder:
    """Accumulates the model tree across one or more layers: path -> sha256, plus directories."""

    allow_override: bool = False
    files: dict[str, str] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)

    def add_file(self, path: str, sha256: str, where: str) -> None:
        if path in self.dirs:
            raise UnsafeContent(f"{where}: {path!r} is both a directory and a file")
        if path in self.files and not self.allow_override:
            raise UnsafeContent(f"{where}: duplicate path {path!r}")
        self.files[path] = sha256
        self._parents(path)

    def add_dir(self, path: str, where: str) -> None:
        if path in self.files:
            if not self.allow_override:
                raise UnsafeContent(f"{where}: {path!r} is both a file and a directory")
            del self.files[path]
        self.dirs.add(path)
        self._parents(path)

    def _parents(self, path: str) -> None:
        parent = posixpath.dirname(path)
        while parent:
            if parent in self.files:
                raise UnsafeContent(f"{parent!r} is a file but {path!r} is inside it")
            self.dirs.add(parent)
            parent = posixpath.dirname(parent)

    def remove(self, path: str, *, contents_only: bool = False) -> None:
        prefix = path + "/" if path else ""
        for p in [
            p for p in self.files if p.startswith(prefix) or (p == path and not contents_only)
        ]:
            del self.files[p]
        for d in [d for d in self.dirs if d.startswith(prefix)]:
            self.dirs.discard(d)
        if not contents_only:
            self.dirs.discard(path)


def open_decompressed(raw: IO[bytes], compression: Compression) -> IO[bytes]:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw)
    return raw


def unpack(
    stream: IO[bytes],
    tree: TreeBuilder,
    write: FileWriter,
    *,
    root: str,
    whiteouts: bool,
    where: str,
    max_bytes: int,
) -> int:
    """Unpack one tar stream into ``tree``; return the bytes written. Raises on hostile input."""
    written = 0
    links: list[tuple[str, str, str]] = []  # (path, kind, target path in tree)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                path = _select(member.name, root, where)
                if path is None:
                    continue
                name = posixpath.basename(path)
                if whiteouts and name.startswith(WHITEOUT):
                    parent = posixpath.dirname(path)
                    if name == OPAQUE:
                        tree.remove(parent, contents_only=True)
                    else:
                        tree.remove(posixpath.join(parent, name[len(WHITEOUT) :]))
                    continue
                if member.isdir():
                    tree.add_dir(path, where)
                elif member.isreg() and not member.issparse():
                    if member.size > max_bytes - written:
                        raise UnsafeContent(
                            f"{where}: member {path!r} of {member.size} bytes exceeds the "
                            f"{max_bytes} bytes the store can take"
                        )
                    reader = tar.extractfile(member)
                    assert reader is not None
                    tree.add_file(path, write(path, reader, member.size), where)
                    written += member.size
                elif member.issym():
                    target = posixpath.normpath(
                        posixpath.join(posixpath.dirname(path), member.linkname)
                    )
                    if (
                        member.linkname.startswith("/")
                        or target == ".."
                        or target.startswith("../")
                    ):
                        raise UnsafeContent(
                            f"{where}: symlink {path!r} -> {member.linkname!r} "
                            "leaves the model tree"
                        )
                    links.append((path, "symlink", target))
                elif member.islnk():
                    linked = _select(member.linkname, root, where)
                    if linked is None:
                        raise UnsafeContent(
                            f"{where}: hard link {path!r} -> {member.linkname!r} "
                            "leaves the model tree"
                        )
                    links.append((path, "hard link", linked))
                else:
                    raise UnsafeContent(
                        f"{where}: {path!r} is a {_kind(member)}; only regular files, directories "
                        "and links inside the tree are accepted"
                    )
    except tarfile.TarError as exc:
        raise UnsupportedManifest(f"{where}: layer is not a valid tar archive: {exc}") from exc
    except (EOFError, OSError, zstandard.ZstdError) as exc:
        raise UnsupportedManifest(f"{where}: layer cannot be decompressed: {exc}") from exc
    _resolve_links(tree, links, where)
    return written


def _resolve_links(tree: TreeBuilder, links: list[tuple[str, str, str]], where: str) -> None:
    """Turn links into second names of regular files, following chains of links in the tree."""
    pending = links
    while pending:
        left = []
        for path, kind, target in pending:
            if target in tree.files:
                tree.add_file(path, tree.files[target], where)
            elif target in tree.dirs:
                raise UnsafeContent(f"{where}: {kind} {path!r} names a directory ({target!r})")
            else:
                left.append((path, kind, target))
        if len(left) == len(pending):
            path, kind, target = left[0]
            raise UnsafeContent(
                f"{where}: {kind} {path!r} -> {target!r} names no file in the model"
            )
        pending = left


def _select(name: str, root: str, where: str) -> str | None:
    """The model-relative path of a member, or None when it lies outside ``root``."""
    if name.startswith("/"):
        raise UnsafeContent(f"{where}: absolute path {name!r} in layer")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeContent(f"{where}: path {name!r} leaves the model tree (..)")
    if root:
        root_parts = root.split("/")
        if parts[: len(root_parts)] != root_parts:
            return None
        parts = parts[len(root_parts) :]
    if not parts:
        return None
    return safe_relpath("/".join(parts), what=where)


def _kind(member: Any) -> str:
    if member.ischr():
        return "character device"
    if member.isblk():
        return "block device"
    if member.isfifo():
        return "FIFO"
    if member.issparse():
        return "sparse file"
    return f"tar member of type {member.type!r}"
