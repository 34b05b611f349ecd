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

TAR_BUFFER = 4 * 1024 * 1024
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


@dataclass
class LayerTree:
    """What one tar layer contributes, before it is merged over the layers below it."""

    files: TreeBuilder = field(default_factory=TreeBuilder)
    removals: list[tuple[str, bool]] = field(default_factory=list)
    """Whiteouts, in order: (path, contents_only)."""
    links: list[tuple[str, str, str]] = field(default_factory=list)
    """(path, kind, target path in the tree), resolved after the merge."""
    written: int = 0


def merge(tree: TreeBuilder, layer: LayerTree, where: str) -> None:
    """Apply ``layer`` over ``tree``: whiteouts first, then its entries, then its links."""
    for path, contents_only in layer.removals:
        tree.remove(path, contents_only=contents_only)
    for d in sorted(layer.files.dirs):
        tree.add_dir(d, where)
    for path, sha in layer.files.files.items():
        tree.add_file(path, sha, where)
    _resolve_links(tree, layer.links, where)


def open_decompressed(raw: IO[bytes], compression: Compression) -> IO[bytes]:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw)
    return raw


def unpack(
    stream: IO[bytes],
    write: FileWriter,
    *,
    root: str,
    whiteouts: bool,
    where: str,
    max_bytes: int,
) -> LayerTree:
    """Unpack one tar stream; return what it contributes. Raises on hostile input."""
    layer = LayerTree()
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BUFFER) as tar:
            for member in tar:
                path = _select(member.name, root, where)
                if path is None:
                    continue
                name = posixpath.basename(path)
                if whiteouts and name.startswith(WHITEOUT):
                    parent = posixpath.dirname(path)
                    if name == OPAQUE:
                        layer.removals.append((parent, True))
                    else:
                        layer.removals.append(
                            (posixpath.join(parent, name[len(WHITEOUT) :]), False)
                        )
                    continue
                if member.isdir():
                    layer.files.add_dir(path, where)
                elif member.isreg() and not member.issparse():
                    if member.size > max_bytes - layer.written:
                        raise UnsafeContent(
                            f"{where}: member {path!r} of {member.size} bytes exceeds the "
                            f"{max_bytes} bytes the store can take"
                        )
                    reader = tar.extractfile(member)
                    assert reader is not None
                    layer.files.add_file(path, write(path, reader, member.size), where)
                    layer.written += member.size
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
                    layer.links.append((path, "symlink", target))
                elif member.islnk():
                    linked = _select(member.linkname, root, where)
                    if linked is None:
                        raise UnsafeContent(
                            f"{where}: hard link {path!r} -> {member.linkname!r} "
                            "leaves the model tree"
                        )
                    layer.links.append((path, "hard link", linked))
                else:
                    raise UnsafeContent(
                        f"{where}: {path!r} is a {_kind(member)}; only regular files, directories "
                        "and links inside the tree are accepted"
                    )
    except tarfile.TarError as exc:
        raise UnsupportedManifest(f"{where}: layer is not a valid tar archive: {exc}") from exc
    except (EOFError, zstandard.ZstdError) as exc:
        raise UnsupportedManifest(f"{where}: layer cannot be decompressed: {exc}") from exc
    except OSError as exc:
        if isinstance(exc, gzip.BadGzipFile):
            raise UnsupportedManifest(f"{where}: layer cannot be decompressed: {exc}") from exc
        raise
    return layer


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
