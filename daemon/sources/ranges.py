"""HTTP for the sources: ranged GETs into caller-owned buffers, small bounded requests, and
HTTP status -> SourceError.

One keep-alive ``http.client`` connection per thread and host: the bytes go from the socket into
the caller's (page-aligned, reused) buffer with no intermediate copy, which urllib3 and botocore
cannot do (their ``readinto`` reads into a fresh bytes object and copies it).

What a server can make the node do is bounded:

- Credentials: ``Authorization`` goes only to the scheme and host the request was addressed to;
  a redirect to another host, or from https to http, drops it. A 401 from a redirect target is
  refused, never answered.
- Reads: an error, redirect or challenge body is read up to ``DRAIN_BYTES`` (the first
  ``ERROR_KEEP_BYTES`` kept for the message), else the connection is dropped; a small request's
  body stops at its ``max_body``.
- Time: a ranged read moving less than ``stall_bytes_per_s`` over ``stall_window_s`` and a small
  request past its deadline are aborted by :class:`Watchdog` (it shuts the socket down, which
  wakes the blocked read) and fail retryable (``stalled``, ``timeout``).
- Ranges: a 206 must carry the ``Content-Range`` asked for (and the object's size and ETag
  when known); anything else fails.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from weightcache.daemon.config import FetchConfig
from weightcache.daemon.errors import SourceError
from weightcache.daemon.retry import RetryAfter

MAX_REDIRECTS = 5
ERROR_KEEP_BYTES = 4096
"""Bytes of an error body kept for the message (of which 300 characters are shown)."""
DRAIN_BYTES = 64 * 1024
"""Bytes of an unwanted body (error, redirect, challenge) read so the connection can be reused;
a longer body drops the connection instead."""
SLICE_BYTES = 1024 * 1024
"""Largest read into a buffer between two progress updates the watchdog can see."""
CONNECT_TIMEOUT_S = 10.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)$")
_NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError)


@dataclass(frozen=True)
class Limits:
    """The time bounds of the sources' HTTP, from :class:`FetchConfig`."""

    timeout_s: float
    """Per socket operation (connect at most ``CONNECT_TIMEOUT_S``)."""
    stall_bytes_per_s: int
    """Below this rate over ``stall_window_s`` a ranged read is aborted; 0: never."""
    stall_window_s: float
    request_deadline_s: float
    """Overall deadline of a small request (manifest, token, HEAD), redirects included."""

    @classmethod
    def of(cls, fetch: FetchConfig) -> Limits:
        return cls(
            timeout_s=fetch.timeout_s,
            stall_bytes_per_s=fetch.stall_bytes_per_s,
            stall_window_s=fetch.stall_window_s,
            request_deadline_s=fetch.request_deadline_s,
        )

    @classmethod
    def default(cls, timeout_s: float | None = None) -> Limits:
        """The configuration's defaults, with ``timeout_s`` when given."""
        limits = cls.of(FetchConfig())
        return limits if timeout_s is None else replace(limits, timeout_s=timeout_s)


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system's trust store, plus ``ca_file`` (PEM) when given."""
    ctx = ssl.create_default_context()
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise SourceError(f"cannot load CA file {ca_file}: {exc}", reason="invalid") from exc
    return ctx


def status_error(status: int, retry_after: str | None, body: bytes, what: str) -> SourceError:
    """Map an HTTP error status to a SourceError with a stable reason (and the status)."""
    text = body[:300].decode(errors="replace").strip()
    detail = f"{what}: HTTP {status}" + (f": {text}" if text else "")
    if status in (429, 503) and retry_after:
        return RetryAfter(
            detail,
            reason="throttled" if status == 429 else "server",
            delay=_retry_after(retry_after),
            status=status,
        )
    if status == 429:
        return SourceError(detail, reason="throttled", retryable=True, status=status)
    if status in (401, 403):
        return SourceError(detail, reason="auth", status=status)
    if status == 404:
        return SourceError(detail, reason="not_found", status=status)
    if status == 412:
        return SourceError(
            f"{what}: the object changed since the model was resolved",
            reason="changed",
            status=status,
        )
    if status >= 500:
        return SourceError(detail, reason="server", retryable=True, status=status)
    return SourceError(detail, reason="invalid", status=status)


def _retry_after(value: str) -> float:
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0  # an HTTP date: rare here; a short wait is a safe reading


# -- the watchdog -------------------------------------------------------------------------------


class Watch:
    """One exchange on one socket, as the watchdog sees it."""

    __slots__ = ("_sock", "deadline", "fired", "floor", "mark_at", "mark_moved", "moved", "window")

    def __init__(
        self, sock: socket.socket, deadline: float | None, floor: int, window: float
    ) -> None:
        # A duplicate of the descriptor, owned here and closed only under the watchdog's lock,
        # so shutting it down can never reach a descriptor number reused by another socket.
        self._sock = socket.fromfd(sock.fileno(), sock.family, sock.type)
        self.deadline = deadline
        self.floor = floor
        self.window = window
        self.moved = 0
        """Bytes moved so far; the reader adds to it."""
        self.mark_at = time.monotonic()
        self.mark_moved = 0
        self.fired: SourceError | None = None

    def next_check(self) -> float:
        at = self.deadline if self.deadline is not None else float("inf")
        if self.floor:
            at = min(at, self.mark_at + self.window)
        return at

    def _abort(self, error: SourceError) -> None:
        self.fired = error
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _close(self) -> None:
        self._sock.close()


class Watchdog:
    """One thread that aborts exchanges which stall or pass their deadline. It sleeps until the
    earliest check any exchange needs, so an idle node wakes it never."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None

    def watch(
        self,
        sock: socket.socket,
        *,
        deadline: float | None = None,
        floor_bytes_per_s: int = 0,
        window_s: float = 0.0,
    ) -> Watch:
        w = Watch(sock, deadline, floor_bytes_per_s, window_s)
        with self._cond:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="wc-http-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return w

    def release(self, w: Watch) -> None:
        with self._cond:
            self._watches.discard(w)
            w._close()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for w in list(self._watches):
                    self._check(w, now)
                pending = (w.next_check() for w in self._watches if w.fired is None)
                wake = min(pending, default=float("inf"))
                self._cond.wait(None if wake == float("inf") else max(0.0, wake - now) + 0.01)

    def _check(self, w: Watch, now: float) -> None:
        if w.fired is not None:
            return
        if w.deadline is not None and now >= w.deadline:
            w._abort(SourceError("no answer within the deadline", reason="timeout", retryable=True))
            return
        if w.floor and now >= w.mark_at + w.window:
            moved = w.moved - w.mark_moved
            if moved < w.floor * w.window:
                w._abort(
                    SourceError(
                        f"stalled: {moved} bytes in {now - w.mark_at:.1f}s, below "
                        f"{w.floor} bytes/s",
                        reason="stalled",
                        retryable=True,
                    )
                )
                return
            w.mark_at, w.mark_moved = now, w.moved


WATCHDOG = Watchdog()


# -- responses ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A small request's answer, its body read (at most ``max_body + 1`` bytes)."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str
    """Where the answer came from (after redirects)."""
    auth: str | None
    """The Authorization header that was accepted at the first host, if any."""


@dataclass
class _Open:
    resp: http.client.HTTPResponse
    url: str
    key: tuple[str, str]
    watch: Watch
    auth: str | None


Authorize = Callable[[str], str | None]
"""Answers a 401 challenge (the WWW-Authenticate value) with an Authorization header, or None."""


def _read_timeout(conn: http.client.HTTPConnection, timeout_s: float) -> None:
    """Connected with the connect timeout; read with the full one."""
    sock = conn.sock
    if sock is not None:
        sock.settimeout(timeout_s)


def _dropped(sock: socket.socket) -> bool:
    """An idle keep-alive connection is readable only if the server closed it."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _safe(url: str) -> str:
    """A URL for messages: without its query string, which may carry a signature."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class RangeClient:
    """Ranged GETs into buffers and small bounded requests over per-thread keep-alive
    connections, with the rules in the module docstring."""

    def __init__(self, limits: Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self.limits = limits
        self._ssl = ssl_context or ssl.create_default_context()
        self._local = threading.local()

    # -- connections ---------------------------------------------------------------------------

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        pool: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "pool", {}
        )
        conn = pool.get((scheme, netloc))
        if conn is None:
            connect_s = min(self.limits.timeout_s, CONNECT_TIMEOUT_S)
            if scheme == "https":
                conn = http.client.HTTPSConnection(netloc, timeout=connect_s, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(netloc, timeout=connect_s)
            pool[(scheme, netloc)] = conn
        if conn.sock is not None and _dropped(conn.sock):
            conn.close()  # the server closed the idle connection (or sent what nobody asked for)
        if conn.sock is None:
            conn.connect()
            _read_timeout(conn, self.limits.timeout_s)
        return conn

    def _drop(self, key: tuple[str, str]) -> None:
        conn = self._local.__dict__.get("pool", {}).pop(key, None)
        if conn is not None:
            conn.close()

    # -- one request, following redirects ------------------------------------------------------

    def _open(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        auth: str | None,
        authorize: Authorize | None,
        deadline: float | None,
        stall: bool,
    ) -> _Open:
        """Send the request and follow redirects and one challenge; return the final response
        (any status but a redirect or an answered 401) with its watch still held."""
        first = urlsplit(url)
        origin = (first.scheme, first.netloc)
        answered = False
        for _ in range(MAX_REDIRECTS + 2):
            parts = urlsplit(url)
            key = (parts.scheme, parts.netloc)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise SourceError(f"{method} {_safe(url)}: not an http(s) URL", reason="invalid")
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            send = dict(headers)
            if auth and key == origin:
                send["Authorization"] = auth
            try:
                conn = self._connection(*key)
            except _NETWORK_ERRORS as exc:
                self._drop(key)
                raise SourceError(
                    f"{method} {_safe(url)}: {exc}", reason="network", retryable=True
                ) from exc
            assert conn.sock is not None
            floor = self.limits.stall_bytes_per_s if stall else 0
            watch = WATCHDOG.watch(
                conn.sock,
                deadline=deadline,
                floor_bytes_per_s=floor,
                window_s=self.limits.stall_window_s,
            )
            try:
                try:
                    conn.request(method, path, headers=send)
                    resp = conn.getresponse()
                except _NETWORK_ERRORS as exc:
                    raise watch.fired or SourceError(
                        f"{method} {_safe(url)}: {exc}", reason="network", retryable=True
                    ) from exc
                location = resp.getheader("Location")
                if resp.status in (301, 302, 303, 307, 308) and location:
                    self._drain(resp, key, watch)
                    WATCHDOG.release(watch)
                    url = urljoin(url, location)
                    continue
                if resp.status == 401:
                    challenge = resp.getheader("WWW-Authenticate", "")
                    self._drain(resp, key, watch)
                    WATCHDOG.release(watch)
                    if key != origin:
                        raise SourceError(
                            f"{method} {_safe(url)}: HTTP 401 from {parts.netloc}, where "
                            f"{first.netloc} redirected; the credentials of "
                            f"{first.scheme}://{first.netloc} are never sent to another host",
                            reason="auth",
                        )
                    if authorize is None or answered:
                        raise status_error(401, None, b"", f"{method} {_safe(url)}")
                    answered = True
                    auth = authorize(challenge)
                    if auth is None:
                        raise status_error(401, None, b"", f"{method} {_safe(url)}")
                    url = first.geturl()
                    continue
            except BaseException:
                WATCHDOG.release(watch)
                self._drop(key)
                raise
            return _Open(resp, url, key, watch, auth)
        raise SourceError(f"{method} {_safe(url)}: too many redirects", reason="invalid")

    def _drain(self, resp: http.client.HTTPResponse, key: tuple[str, str], watch: Watch) -> bytes:
        """Read an unwanted body up to ``DRAIN_BYTES``; return its first ``ERROR_KEEP_BYTES``.
        A longer body (or one that fails) drops the connection."""
        kept = b""
        try:
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > DRAIN_BYTES:
                kept = resp.read(ERROR_KEEP_BYTES)
            else:
                read = 0
                while read <= DRAIN_BYTES:
                    data = resp.read(min(DRAIN_BYTES + 1 - read, 1 << 16))
                    if not data:
                        break
                    if len(kept) < ERROR_KEEP_BYTES:
                        kept += data[: ERROR_KEEP_BYTES - len(kept)]
                    read += len(data)
                    watch.moved += len(data)
        except _NETWORK_ERRORS:
            pass
        if not resp.isclosed():
            self._drop(key)
        return kept

    # -- small requests ------------------------------------------------------------------------

    def fetch(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        max_body: int,
        auth: str | None = None,
        authorize: Authorize | None = None,
    ) -> Reply:
        """A request whose whole answer (redirects, headers, at most ``max_body + 1`` body
        bytes) must arrive within ``request_deadline_s``. Statuses of 400 and above raise."""
        deadline = time.monotonic() + self.limits.request_deadline_s
        op = self._open(
            method,
            url,
            headers or {},
            auth=auth,
            authorize=authorize,
            deadline=deadline,
            stall=False,
        )
        resp, what = op.resp, f"{method} {_safe(op.url)}"
        try:
            if resp.status >= 400:
                body = self._drain(resp, op.key, op.watch)
                raise op.watch.fired or status_error(
                    resp.status, resp.getheader("Retry-After"), body, what
                )
            if resp.status not in (200, 203, 204, 206):
                self._drain(resp, op.key, op.watch)
                raise SourceError(f"{what}: unexpected HTTP {resp.status}", reason="invalid")
            chunks: list[bytes] = []
            got = 0
            try:
                while got <= max_body:
                    data = resp.read(min(max_body + 1 - got, 1 << 16))
                    if not data:
                        break
                    chunks.append(data)
                    got += len(data)
            except _NETWORK_ERRORS as exc:
                raise op.watch.fired or SourceError(
                    f"{what}: body cut short: {exc}", reason="truncated", retryable=True
                ) from exc
            if op.watch.fired is not None:
                raise op.watch.fired
            if not resp.isclosed():
                self._drop(op.key)  # longer than max_body: the rest is never read
            return Reply(resp.status, resp.msg, b"".join(chunks), op.url, op.auth)
        except BaseException:
            self._drop(op.key)
            raise
        finally:
            WATCHDOG.release(op.watch)

    # -- ranged reads --------------------------------------------------------------------------

    def get_into(
        self,
        url: str,
        start: int,
        buf: memoryview,
        headers: Mapping[str, str] | None = None,
        *,
        auth: str | None = None,
        authorize: Authorize | None = None,
        size: int | None = None,
        etag: str | None = None,
    ) -> str | None:
        """Fill ``buf`` with ``len(buf)`` bytes of ``url`` from ``start``.

        ``auth`` goes to the URL's own scheme and host only. On a 401 from there,
        ``authorize(challenge)`` may supply a new header, tried once; the header that worked is
        returned so the caller can reuse it. ``size`` (the object's length) and ``etag`` (its
        ETag, quoted or not) are checked against the answer when given."""
        length = len(buf)
        send = {**(headers or {}), "Range": f"bytes={start}-{start + length - 1}"}
        op = self._open("GET", url, send, auth=auth, authorize=authorize, deadline=None, stall=True)
        resp, what = op.resp, f"GET {_safe(op.url)}"
        try:
            if resp.status >= 400:
                body = self._drain(resp, op.key, op.watch)
                raise op.watch.fired or status_error(
                    resp.status, resp.getheader("Retry-After"), body, what
                )
            if resp.status not in (200, 206):
                self._drain(resp, op.key, op.watch)
                raise SourceError(f"{what}: unexpected HTTP {resp.status}", reason="invalid")
            _check_answer(resp, what, start, length, size, etag)
            self._fill(resp, op, what, start, buf)
        except BaseException:
            WATCHDOG.release(op.watch)
            self._drop(op.key)
            raise
        WATCHDOG.release(op.watch)
        if not resp.isclosed():
            self._drop(op.key)  # a 200 carries the rest of the object: not reusable
        return op.auth

    def _fill(
        self, resp: http.client.HTTPResponse, op: _Open, what: str, start: int, buf: memoryview
    ) -> None:
        length, got, watch = len(buf), 0, op.watch
        # Small enough that a source at the floor rate shows progress several times a window.
        step = SLICE_BYTES
        if watch.floor:
            step = max(64 * 1024, min(SLICE_BYTES, int(watch.floor * watch.window) // 4))
        try:
            if resp.status == 200 and start:
                skip = start  # the server ignored Range
                while skip:
                    data = resp.read(min(skip, 1 << 20))
                    if not data:
                        break
                    skip -= len(data)
                    watch.moved += len(data)
            while got < length:
                n = resp.readinto(buf[got : min(length, got + step)])
                if not n:
                    break
                got += n
                watch.moved += n
        except _NETWORK_ERRORS as exc:
            raise watch.fired or SourceError(
                f"{what}: body cut short: {exc}", reason="truncated", retryable=True
            ) from exc
        if watch.fired is not None:
            raise watch.fired
        if got < length:
            raise SourceError(
                f"{what}: body cut short at {got} of {length} bytes",
                reason="truncated",
                retryable=True,
            )


def _check_answer(
    resp: http.client.HTTPResponse,
    what: str,
    start: int,
    length: int,
    size: int | None,
    etag: str | None,
) -> None:
    """Does this 200/206 carry the bytes asked for, of the object expected?"""
    got_etag = resp.getheader("ETag")
    if etag and got_etag and got_etag.strip().removeprefix("W/").strip('"') != etag.strip('"'):
        raise SourceError(
            f"{what}: the object changed since the model was resolved (ETag {got_etag[:80]})",
            reason="changed",
        )
    end = start + length - 1
    if resp.status == 206:
        header = (resp.getheader("Content-Range") or "").strip()
        m = _CONTENT_RANGE.match(header)
        if m is None or int(m.group(1)) != start or int(m.group(2)) != end:
            raise SourceError(
                f"{what}: asked for bytes {start}-{end}, answered Content-Range {header[:80]!r}",
                reason="invalid",
            )
        total = m.group(3)
        if total != "*" and (int(total) <= end or (size is not None and int(total) != size)):
            raise SourceError(
                f"{what}: Content-Range says the object has {total} bytes"
                + (f", not {size}" if size is not None else f", too few for byte {end}"),
                reason="invalid",
            )
        expected_length = length
    else:
        expected_length = size if size is not None else -1
    cl = resp.getheader("Content-Length")
    if cl is not None and cl.strip().isdigit():
        n = int(cl)
        if (expected_length >= 0 and n != expected_length) or (
            resp.status == 200 and n < start + length
        ):
            raise SourceError(
                f"{what}: Content-Length {n} does not fit bytes {start}-{end}", reason="invalid"
            )
