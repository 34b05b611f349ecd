"""Log output: ``--log-format text`` (one line a record, for a terminal) or ``json`` (one object a
line, for a log pipeline), always on stderr.

A JSON line carries ``time`` (RFC 3339, UTC), ``level``, ``logger`` and ``message``, plus
``digest`` and ``ref`` on every line about a model. A model is recognised in the record's
``extra`` fields (``digest``, ``ref``), else in its arguments and message (a ``sha256:`` digest,
an ``oci://``, ``s3://`` or ``file://`` reference); the missing half is looked up in the store's
index when a :class:`ModelNames` is installed, so a line naming only the digest still carries the
reference. Both formats redact what looks like a credential (``Authorization`` values, URL
user-info, ``password=``/``token=``/signature query parameters) from the message and any
traceback.

:class:`RecentErrors` keeps the last warnings and errors in memory for ``weightcache status``.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from weightcache.daemon.store.index import Index

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_REF = re.compile(r"\b(?:oci|s3|file)://[^\s,;()'\"<>]+")
_SECRETS = (
    # Authorization: Bearer xyz / Basic xyz, in headers or reprs of them
    (
        re.compile(r"(?i)\b(authorization|proxy-authorization)(['\"]?\s*[:=]\s*['\"]?)[^'\"\n]+"),
        r"\1\2<redacted>",
    ),
    # https://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1<redacted>@"),
    # password=..., token: ..., X-Amz-Signature=..., secret_access_key=...
    (
        re.compile(
            r"(?i)\b(password|passwd|secret|secret_access_key|aws_secret_access_key|token|"
            r"access_token|refresh_token|x-amz-signature|x-amz-security-token|x-amz-credential|"
            r"sig|signature)(['\"]?\s*[=:]\s*['\"]?)[^\s&'\",;]+"
        ),
        r"\1\2<redacted>",
    ),
)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``<redacted>``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class ModelNames:
    """digest <-> reference from a store's index, read through a connection of its own (so a
    log call made while the store's index is busy never waits on it), remembered in a bounded
    map. Thread-safe."""

    CAPACITY = 1024

    def __init__(self, index_path: Path) -> None:
        self._index = Index(index_path)
        self._lock = threading.Lock()
        self._refs: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._digests: collections.OrderedDict[str, str] = collections.OrderedDict()

    def close(self) -> None:
        self._index.close()

    def ref_of(self, digest: str) -> str | None:
        with self._lock:
            if digest in self._refs:
                return self._refs[digest]
            row = self._index.model(digest)
            if row is None:
                return None
            self._remember(digest, row.ref)
            return row.ref

    def digest_of(self, ref: str) -> str | None:
        with self._lock:
            if ref in self._digests:
                return self._digests[ref]
            digest = self._index.ref_digest(ref)
            if digest is None:
                return None
            self._remember(digest, ref)
            return digest

    def _remember(self, digest: str, ref: str) -> None:
        self._refs[digest] = ref
        self._digests[ref] = digest
        for table in (self._refs, self._digests):
            while len(table) > self.CAPACITY:
                table.popitem(last=False)


_names: ModelNames | None = None


def use_model_names(names: ModelNames | None) -> None:
    """Look models up in this store from now on (None: stop)."""
    global _names
    _names = names


def model_fields(record: logging.LogRecord, message: str) -> dict[str, str]:
    """``digest`` and ``ref`` of the model a record is about; empty when it names none."""
    digest = getattr(record, "digest", None)
    ref = getattr(record, "ref", None)
    args = record.args if isinstance(record.args, tuple) else ()
    texts = [str(a) for a in args if isinstance(a, str) or hasattr(a, "scheme")] + [message]
    names = _names
    for text in texts:
        if digest is None:
            for found in _DIGEST.findall(text):
                # A blob's sha256 looks the same: with an index to ask, only models count.
                if names is None or names.ref_of(found) is not None:
                    digest = found
                    break
        if ref is None:
            match = _REF.search(text)
            if match:
                ref = match.group(0).rstrip(".:")
    if names is not None:
        try:
            if digest is not None and ref is None:
                ref = names.ref_of(str(digest))
            elif ref is not None and digest is None:
                digest = names.digest_of(str(ref))
        except Exception:
            pass
    out = {}
    if digest is not None:
        out["digest"] = str(digest)
    if ref is not None:
        out["ref"] = redact(str(ref))
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(message),
        }
        doc.update(model_fields(record, message))
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``, credentials redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(fmt: str, level: str, stream: TextIO | None = None) -> None:
    """Route every log record to ``stream`` (stderr) in ``fmt`` at ``level`` and above."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, logging.StreamHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class RecentErrors(logging.Handler):
    """The last ``capacity`` warnings and errors, as the JSON format's objects."""

    def __init__(self, capacity: int = 50) -> None:
        super().__init__(logging.WARNING)
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._formatter = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._records.append(json.loads(self._formatter.format(record)))
        except Exception:
            self.handleError(record)

    def snapshot(self) -> list[dict[str, Any]]:
        """Oldest first."""
        return list(self._records)


def attach(handler: logging.Handler) -> Callable[[], None]:
    """Add ``handler`` to the root logger; the returned function removes it."""
    root = logging.getLogger()
    root.addHandler(handler)
    return lambda: root.removeHandler(handler)
