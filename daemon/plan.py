"""What a source resolves a reference to: an immutable plan of the bytes that make a model.

A plan lists *items*: raw files (one remote object -> one file in the tree) and archives (one tar
layer unpacked into the tree). Paths are validated here, once, so nothing downstream can be
handed an absolute path, a ``..`` segment or a duplicate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from weightcache.daemon.errors import UnsafeContent
from weightcache.daemon.references import ModelRef

Compression = Literal["none", "gzip", "zstd"]

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255


def safe_relpath(raw: object, *, what: str) -> str:
    """Normalise a model-relative path or raise :class:`UnsafeContent` saying why not.

    Accepts ``a/b.bin`` and ``./a/b.bin``; rejects anything but a string, empty paths,
    absolute paths, ``..`` segments, NUL bytes, backslashes, text that is not valid Unicode
    (lone surrogates) and over-long names.
    """
    if not isinstance(raw, str):
        raise UnsafeContent(f"{what}: path of type {type(raw).__name__} is not a string")
    try:
        raw.encode()
    except UnicodeEncodeError as exc:
        raise UnsafeContent(f"{what}: path {raw[:80]!r} is not valid Unicode") from exc
    if not raw or "\x00" in raw:
        raise UnsafeContent(f"{what}: empty path or NUL byte in {raw!r}")
    if "\\" in raw:
        raise UnsafeContent(f"{what}: backslash in path {raw!r}")
    if raw.startswith("/"):
        raise UnsafeContent(f"{what}: absolute path {raw!r}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not parts:
        raise UnsafeContent(f"{what}: path {raw!r} names the model root")
    if ".." in parts:
        raise UnsafeContent(f"{what}: path {raw!r} leaves the model tree (..)")
    if any(len(p.encode()) > MAX_COMPONENT_BYTES for p in parts):
        raise UnsafeContent(f"{what}: a component of {raw!r} is longer than 255 bytes")
    norm = "/".join(parts)
    if len(norm.encode()) > MAX_PATH_BYTES:
        raise UnsafeContent(f"{what}: path {raw[:80]!r}... is longer than {MAX_PATH_BYTES} bytes")
    return norm


@dataclass(frozen=True)
class RemoteFile:
    """One remote object that becomes one file of the model tree."""

    path: str
    """Model-relative POSIX path (validated)."""
    size: int
    locator: str
    """What the source needs to fetch it: a blob digest, an object key, an absolute path."""
    sha256: str | None = None
    """``sha256:<hex>`` when the source announces it (OCI); else computed while fetching."""
    version: str = ""
    """A version tag the source checks on every read (S3 ETag); empty when not applicable."""
    md5: str | None = None
    """Hex MD5 of the whole object when the source announces one (a single-part S3 ETag) and
    no sha256: checked while fetching."""

    @property
    def trusted_on_first_fetch(self) -> bool:
        """Nothing the source announced can check the bytes: they are taken as first fetched."""
        return self.sha256 is None and self.md5 is None

    @property
    def staging_key(self) -> str:
        """A stable name for this item's partial download, the same across restarts."""
        if self.sha256:
            return self.sha256.removeprefix("sha256:")
        return hashlib.sha256(
            f"{self.locator}\x00{self.version}\x00{self.size}".encode()
        ).hexdigest()


@dataclass(frozen=True)
class RemoteArchive:
    """One tar layer (OCI) unpacked into the model tree."""

    locator: str
    size: int
    sha256: str
    compression: Compression
    root: str = ""
    """Only members under this directory are taken, re-rooted at the model root ("" = all)."""
    whiteouts: bool = False
    """Image layers: honour ``.wh.`` whiteout entries from later layers."""

    @property
    def staging_key(self) -> str:
        return self.sha256.removeprefix("sha256:")


Item = RemoteFile | RemoteArchive


@dataclass(frozen=True)
class ModelPlan:
    """A resolved model: its digest and the items that make its tree."""

    ref: ModelRef
    """The reference as given (tag kept, for display)."""
    digest: str
    """``sha256:<hex>``: the manifest digest (OCI) or the canonical listing's digest."""
    format: str
    """``oras``, ``modelkit``, ``modelpack``, ``image``, ``s3`` or ``file``."""
    items: Sequence[Item] = field(default_factory=tuple)

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.items)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for item in self.items:
            if isinstance(item, RemoteFile):
                if item.path in seen:
                    raise UnsafeContent(f"{self.ref}: duplicate path {item.path!r}")
                seen.add(item.path)
            if item.size < 0:
                raise UnsafeContent(f"{self.ref}: negative size for {item.locator}")
        for path in seen:  # a file cannot also be a directory holding another file
            parent = path.rpartition("/")[0]
            while parent:
                if parent in seen:
                    raise UnsafeContent(
                        f"{self.ref}: {parent!r} is a file but {path!r} is inside it"
                    )
                parent = parent.rpartition("/")[0]


def listing_digest(entries: Sequence[tuple[str, int, str]]) -> str:
    """The model digest of an S3 prefix or a directory: sha256 over sorted (path, size, version)."""
    h = hashlib.sha256()
    for path, size, version in sorted(entries):
        h.update(f"{path}\x00{size}\x00{version}\n".encode())
    return "sha256:" + h.hexdigest()
