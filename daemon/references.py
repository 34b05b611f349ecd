"""Model references, parsed once at the edge into frozen values.

``oci://HOST[:PORT]/REPO[:TAG|@sha256:HEX]``, ``s3://BUCKET/PREFIX/`` and ``file:///ABS/DIR``.
Every malformed form raises :class:`InvalidReference` with a message saying what is wrong.

A parsed reference is canonical: the registry host in lower case without a trailing dot, the
default HTTPS port dropped, and the registry aliases of the config applied. ``str(ref)`` is that
one form, and it is what the policy matches, the index records, node labels hash and events
name: two spellings of one model are one model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from weightcache.daemon.errors import InvalidReference

# OCI distribution spec: repository name components and tags.
_REPO_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"sha256:[a-f0-9]{64}")
_HOST = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\]"
)
# S3 bucket naming rules (general purpose buckets).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MAX_REF = 4096
_DEFAULT_PORT = 443
Aliases = Mapping[str, str]
"""Registry ``host[:port]`` -> the canonical one it stands for (``[registry] aliases``)."""


@dataclass(frozen=True)
class OciRef:
    """``oci://host[:port]/repository[:tag|@sha256:hex]``. Without tag or digest: ``latest``."""

    host: str
    port: int | None
    repository: str
    tag: str | None
    digest: str | None
    scheme: Literal["oci"] = "oci"

    @property
    def registry(self) -> str:
        """``host[:port]``, as used in docker config.json and hosts.toml."""
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> OciRef:
        return OciRef(self.host, self.port, self.repository, None, digest)

    def __str__(self) -> str:
        suffix = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"oci://{self.registry}/{self.repository}{suffix}"


@dataclass(frozen=True)
class S3Ref:
    """``s3://bucket/prefix/``: every object under the prefix. ``prefix`` is ``""`` or ends in /."""

    bucket: str
    prefix: str
    scheme: Literal["s3"] = "s3"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class FileRef:
    """``file:///absolute/dir``: a local directory."""

    path: PurePosixPath
    scheme: Literal["file"] = "file"

    def __str__(self) -> str:
        return f"file://{self.path}"


ModelRef = OciRef | S3Ref | FileRef


def parse_reference(text: str, aliases: Aliases | None = None) -> ModelRef:
    """Parse a reference into its canonical form; raise :class:`InvalidReference` naming the
    problem. ``aliases`` maps other spellings of a registry (an IP, an internal name) to the
    one the policy and the index use."""
    if not isinstance(text, str) or not text:
        raise InvalidReference("empty model reference")
    if len(text) > _MAX_REF:
        raise InvalidReference(f"model reference is longer than {_MAX_REF} characters")
    if any(c.isspace() or ord(c) < 0x20 for c in text):
        raise InvalidReference(f"model reference {text!r} contains whitespace or control chars")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise InvalidReference(
            f"model reference {text!r} has no scheme; expected oci://, s3:// or file://"
        )
    parser = _PARSERS.get(scheme)
    if parser is None:
        raise InvalidReference(
            f"model reference {text!r} has unknown scheme {scheme!r}; "
            "expected oci://, s3:// or file://"
        )
    ref = parser(text, rest)
    if isinstance(ref, OciRef) and aliases:
        ref = _apply_alias(text, ref, aliases)
    return ref


def canonical_registry(host_port: str) -> str:
    """``host[:port]`` as references spell it after parsing (lower case, no :443): the form
    in which config keys (aliases, insecure hosts, mirrors) are compared."""
    host, port = _split_host_port(host_port, host_port)
    return host if port is None else f"{host}:{port}"


def _apply_alias(text: str, ref: OciRef, aliases: Aliases) -> OciRef:
    target = aliases.get(ref.registry)
    if target is None:
        return ref
    host, port = _split_host_port(text, target)
    return OciRef(host, port, ref.repository, ref.tag, ref.digest)


def _parse_oci(text: str, rest: str) -> OciRef:
    host_port, slash, path = rest.partition("/")
    if not slash or not path:
        raise InvalidReference(f"{text!r}: expected oci://HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]")
    host, port = _split_host_port(text, host_port)
    digest = None
    tag = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _SHA256.fullmatch(digest):
            raise InvalidReference(
                f"{text!r}: digest {digest!r} is not sha256: followed by 64 lowercase hex digits"
            )
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise InvalidReference(
                f"{text!r}: tag {tag!r} must be 1-128 of [A-Za-z0-9_.-], not starting with . or -"
            )
        if digest is not None:
            # Tag and digest together: the digest wins; the tag is informative only.
            tag = None
    if not path or len(path) > 255:
        raise InvalidReference(f"{text!r}: repository name must be 1-255 characters")
    for component in path.split("/"):
        if not _REPO_COMPONENT.fullmatch(component):
            raise InvalidReference(
                f"{text!r}: repository component {component!r} must be lowercase letters, "
                "digits and single separators (., _, __, -)"
            )
    return OciRef(host=host, port=port, repository=path, tag=tag, digest=digest)


def _split_host_port(text: str, host_port: str) -> tuple[str, int | None]:
    if not host_port:
        raise InvalidReference(f"{text!r}: missing registry host")
    host, port_text = host_port, None
    if host_port.startswith("["):
        end = host_port.find("]")
        if end < 0:
            raise InvalidReference(f"{text!r}: unterminated IPv6 address")
        host, tail = host_port[: end + 1], host_port[end + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise InvalidReference(f"{text!r}: unexpected {tail!r} after IPv6 address")
            port_text = tail[1:]
    elif ":" in host_port:
        host, _, port_text = host_port.partition(":")
    if host.endswith(".") and not host.startswith("["):
        host = host[:-1]  # the fully qualified spelling of the same name
    if not _HOST.fullmatch(host) or len(host) > 253:
        raise InvalidReference(f"{text!r}: {host!r} is not a valid registry host name")
    host = host.lower()
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidReference(f"{text!r}: port {port_text!r} is not a number in 1-65535")
    port = int(port_text)
    return host, None if port == _DEFAULT_PORT else port


def _parse_s3(text: str, rest: str) -> S3Ref:
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InvalidReference(f"{text!r}: expected s3://BUCKET/PREFIX/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise InvalidReference(
            f"{text!r}: bucket {bucket!r} must be 3-63 lowercase letters, digits, dots and hyphens"
        )
    if prefix and not prefix.endswith("/"):
        # A prefix without a slash would also match siblings (models/a matches models/ab/).
        prefix += "/"
    if prefix.startswith("/") or "//" in prefix:
        raise InvalidReference(f"{text!r}: prefix {prefix!r} has an empty path segment")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise InvalidReference(f"{text!r}: prefix {prefix!r} contains . or .. segments")
    return S3Ref(bucket=bucket, prefix=prefix)


def _parse_file(text: str, rest: str) -> FileRef:
    if not rest.startswith("/"):
        raise InvalidReference(f"{text!r}: expected file:///ABSOLUTE/DIR (three slashes)")
    path = PurePosixPath(rest)
    if any(part in (".", "..") for part in rest.split("/")):
        raise InvalidReference(f"{text!r}: path contains . or .. segments")
    return FileRef(path=path)


_PARSERS: dict[str, Callable[[str, str], ModelRef]] = {
    "oci": _parse_oci,
    "s3": _parse_s3,
    "file": _parse_file,
}
