"""Safe unpacking of tar layers into a model tree.

Accepted: regular files and directories whose normalised path stays inside the tree.
Links inside the tree are handled deliberately: a hard link or a symlink that resolves, within
the tree, to a regular file becomes a second name for the same content (the same blob, so the
tree holds only regular files and directories); a link that leaves the tree, dangles, or names a
directory is refused. Absolute paths, ``..`` segments, devices, FIFOs and sparse members are
refused, and so is a layer of more than ``max_members`` entries.

Image layers are applied as the OCI image-spec (layer.md) says: ``.wh.<name>`` hides a path of
the layers below, ``.wh..wh..opq`` hides every child of its directory below, both before the
layer's own entries whatever their order in the tar; an entry over an existing path replaces it
(a file over a directory removes the directory's subtree, a directory over a file removes the
file), except a directory over a directory. The model is the ``root`` subtree (``models/``): a
whiteout of ``models`` itself, an opaque whiteout above it, or a non-directory entry named
``models`` empties what the lower layers put there. Other formats refuse a path that appears
twice. Each whiteout costs O(1) amortised: the tree keeps an index of each directory's children,
so removing a subtree touches only what it holds, and every entry is removed at most once.
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import zstandard

from weightcache.daemon.errors import UnsafeContent, UnsupportedManifest
from weightcache.daemon.plan import Compression, safe_relpath

TAR_BUFFER = 4 * 1024 * 1024
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_LAYER_MEMBERS = 100_000
"""Default cap on the entries of one tar layer (every entry counts, taken or not)."""

FileWriter = Callable[[str, IO[bytes], int], str]
"""Writes one member's bytes (path, reader, size) into the store; returns its sha256."""


@dataclass
class TreeBuilder:
    """Accumulates the model tree across one or more layers: path -> sha256, plus directories.

    ``children`` indexes every directory ("" is the model root) by the paths directly in it, so
    whiteouts and replacements cost what they remove, never a scan of the whole tree.
    """

    allow_override: bool = False
    files: dict[str, str] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    children: dict[str, set[str]] = field(default_factory=dict)

    def add_file(self, path: str, sha256: str, where: str) -> None:
        if path in self.dirs:
            if not self.allow_override:
                raise UnsafeContent(f"{where}: {path!r} is both a directory and a file")
            self.remove(path)
        elif path in self.files and not self.allow_override:
            raise UnsafeContent(f"{where}: duplicate path {path!r}")
        self._parents(path, where)
        self.files[path] = sha256
        self.children.setdefault(posixpath.dirname(path), set()).add(path)

    def add_dir(self, path: str, where: str) -> None:
        if path in self.dirs:
            return
        if path in self.files:
            if not self.allow_override:
                raise UnsafeContent(f"{where}: {path!r} is both a file and a directory")
            self.remove(path)
        self._parents(path, where)
        self.dirs.add(path)
        self.children.setdefault(posixpath.dirname(path), set()).add(path)

    def _parents(self, path: str, where: str) -> None:
        """Make every ancestor of ``path`` a directory. The walk up stops at the first one
        already known (its own ancestors are directories already): O(1) amortised."""
        missing: list[str] = []
        parent = posixpath.dirname(path)
        while parent and parent not in self.dirs:
            if parent in self.files:
                if not self.allow_override:
                    raise UnsafeContent(f"{where}: {parent!r} is a file but {path!r} is inside it")
                self.remove(parent)
            missing.append(parent)
            parent = posixpath.dirname(parent)
        for d in reversed(missing):
            self.dirs.add(d)
            self.children.setdefault(posixpath.dirname(d), set()).add(d)

    def remove(self, path: str, *, contents_only: bool = False) -> None:
        """Remove ``path`` and everything under it ("" is the root); with ``contents_only``,
        keep the directory and remove only what it holds. A missing path is not an error."""
        if path in self.files:
            if not contents_only:
                del self.files[path]
                self.children[posixpath.dirname(path)].discard(path)
            return
        if path and path not in self.dirs:
            return
        stack = list(self.children.pop(path, ()))
        while stack:
            p = stack.pop()
            if self.files.pop(p, None) is None:
                self.dirs.discard(p)
                stack.extend(self.children.pop(p, ()))
        if path and not contents_only:
            self.dirs.discard(path)
            self.children[posixpath.dirname(path)].discard(path)


@dataclass
class LayerTree:
    """What one tar layer contributes, before it is merged over the layers below it."""

    files: TreeBuilder = field(default_factory=TreeBuilder)
    removals: list[tuple[str, bool]] = field(default_factory=list)
    """Whiteouts, in order: (path, contents_only); ("", True) empties the tree below."""
    links: list[tuple[str, str, str]] = field(default_factory=list)
    """(path, kind, target path in the tree), resolved after the merge."""
    link_paths: set[str] = field(default_factory=set)
    written: int = 0
    members: int = 0


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
    max_members: int = MAX_LAYER_MEMBERS,
) -> LayerTree:
    """Unpack one tar stream; return what it contributes. Raises on hostile input."""
    layer = LayerTree()
    root_parts = root.split("/") if root else []
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BUFFER) as tar:
            for member in tar:
                layer.members += 1
                if layer.members > max_members:
                    raise UnsafeContent(
                        f"{where}: layer has more than {max_members} entries (max_layer_members)"
                    )
                parts = _parts(member.name, where)
                if not parts and not member.isdir():
                    raise UnsafeContent(f"{where}: {member.name!r} names the layer's root")
                if whiteouts and parts and parts[-1].startswith(WHITEOUT):
                    _whiteout(layer, parts, root_parts, where)
                    continue
                if whiteouts and root_parts and not member.isdir() and _covers(parts, root_parts):
                    # A file (or link, or device) where the model directory was: the lower
                    # layers' model subtree is gone; this entry itself is not in the model.
                    layer.removals.append(("", True))
                    continue
                path = _select(parts, root_parts, where)
                if path is None:
                    continue
                _add_member(tar, member, path, layer, write, root_parts, where, max_bytes)
    except tarfile.TarError as exc:
        raise UnsupportedManifest(f"{where}: layer is not a valid tar archive: {exc}") from exc
    except (EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise UnsupportedManifest(f"{where}: layer cannot be decompressed: {exc}") from exc
    except OSError as exc:
        if isinstance(exc, gzip.BadGzipFile):
            raise UnsupportedManifest(f"{where}: layer cannot be decompressed: {exc}") from exc
        raise
    return layer


def _add_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    path: str,
    layer: LayerTree,
    write: FileWriter,
    root_parts: list[str],
    where: str,
    max_bytes: int,
) -> None:
    if path in layer.link_paths or (
        (member.issym() or member.islnk())
        and (path in layer.files.files or path in layer.files.dirs)
    ):
        raise UnsafeContent(f"{where}: duplicate path {path!r}")
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
        target = posixpath.normpath(posixpath.join(posixpath.dirname(path), member.linkname))
        if (
            not member.linkname
            or member.linkname.startswith("/")
            or target == ".."
            or target.startswith("../")
        ):
            raise UnsafeContent(
                f"{where}: symlink {path!r} -> {member.linkname!r} leaves the model tree"
            )
        layer.files._parents(path, where)
        layer.link_paths.add(path)
        layer.links.append((path, "symlink", target))
    elif member.islnk():
        linked = _select(_parts(member.linkname, where), root_parts, where)
        if linked is None:
            raise UnsafeContent(
                f"{where}: hard link {path!r} -> {member.linkname!r} leaves the model tree"
            )
        layer.files._parents(path, where)
        layer.link_paths.add(path)
        layer.links.append((path, "hard link", linked))
    else:
        raise UnsafeContent(
            f"{where}: {path!r} is a {_kind(member)}; only regular files, directories "
            "and links inside the tree are accepted"
        )


def _whiteout(layer: LayerTree, parts: list[str], root_parts: list[str], where: str) -> None:
    """Record a whiteout entry (``parts`` is its whole path) for the merge over lower layers."""
    name, parent = parts[-1], parts[:-1]
    if name == OPAQUE:
        if _covers(parent, root_parts):  # the model directory or one above it
            layer.removals.append(("", True))
            return
        hidden = _select(parent, root_parts, where)
        if hidden is not None:
            layer.removals.append((hidden, True))
            layer.files.add_dir(hidden, where)  # the marker lives in this layer's directory
        return
    if name.startswith(WHITEOUT + WHITEOUT):
        return  # other AUFS metadata (.wh..wh.plnk, ...): not part of any filesystem
    target = name[len(WHITEOUT) :]
    if target in ("", ".", ".."):
        raise UnsafeContent(f"{where}: whiteout {'/'.join(parts)!r} names no entry")
    if _covers([*parent, target], root_parts):
        layer.removals.append(("", True))
        return
    hidden = _select([*parent, target], root_parts, where)
    if hidden is not None:
        layer.removals.append((hidden, False))
        if posixpath.dirname(hidden):
            layer.files.add_dir(posixpath.dirname(hidden), where)


def _covers(parts: list[str], root_parts: list[str]) -> bool:
    """Whether ``parts`` is the model root itself or one of its ancestors."""
    return len(parts) <= len(root_parts) and root_parts[: len(parts)] == parts


def _resolve_links(tree: TreeBuilder, links: list[tuple[str, str, str]], where: str) -> None:
    """Turn links into second names of regular files, following chains of links in the tree.

    Each link is followed once (a chain is walked, then every link on it is settled), so a
    layer of many links costs time linear in their number; a cycle is refused."""
    pending = {path: (kind, target) for path, kind, target in links}
    settled: dict[str, str] = {}
    for start in pending:
        chain: list[str] = []
        on_chain: set[str] = set()
        path = start
        while path in pending and path not in settled:
            if path in on_chain:
                raise UnsafeContent(f"{where}: links around {start!r} form a cycle")
            chain.append(path)
            on_chain.add(path)
            path = pending[path][1]
        if path in settled:
            sha = settled[path]
        elif path in tree.files:
            sha = tree.files[path]
        else:
            kind, target = pending[chain[-1]]
            if path in tree.dirs:
                raise UnsafeContent(f"{where}: {kind} {chain[-1]!r} names a directory ({target!r})")
            raise UnsafeContent(
                f"{where}: {kind} {chain[-1]!r} -> {target!r} names no file in the model"
            )
        for p in chain:
            settled[p] = sha
    for path, sha in settled.items():
        tree.add_file(path, sha, where)


def _parts(name: str, where: str) -> list[str]:
    """A member name split into its components, refusing absolute paths and ``..``."""
    if name.startswith("/"):
        raise UnsafeContent(f"{where}: absolute path {name!r} in layer")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeContent(f"{where}: path {name!r} leaves the model tree (..)")
    return parts


def _select(parts: list[str], root_parts: list[str], where: str) -> str | None:
    """The model-relative path of a member, or None when it lies outside ``root``."""
    if root_parts:
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
