"""Ranged HTTP GETs straight into caller-owned buffers, and HTTP status -> SourceError.

One keep-alive ``http.client`` connection per thread and host: the bytes go from the socket into
the caller's (page-aligned, reused) buffer with no intermediate copy, which urllib3 and botocore
cannot do (their ``readinto`` reads into a fresh bytes object and copies it).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Mapping
from urllib.parse import urljoin, urlsplit

from weightcache.daemon.errors import SourceError
from weightcache.daemon.retry import RetryAfter

MAX_REDIRECTS = 5


def status_error(status: int, retry_after: str | None, body: bytes, what: str) -> SourceError:
    """Map an HTTP error status to a SourceError with a stable reason."""
    text = body.decode(errors="replace").strip()
    detail = f"{what}: HTTP {status}" + (f": {text}" if text else "")
    if status in (429, 503) and retry_after:
        return RetryAfter(
            detail,
            reason="throttled" if status == 429 else "server",
            delay=_retry_after(retry_after),
        )
    if status == 429:
        return SourceError(detail, reason="throttled", retryable=True)
    if status in (401, 403):
        return SourceError(detail, reason="auth")
    if status == 404:
        return SourceError(detail, reason="not_found")
    if status == 412:
        return SourceError(
            f"{what}: the object changed since the model was resolved", reason="changed"
        )
    if status >= 500:
        return SourceError(detail, reason="server", retryable=True)
    return SourceError(detail, reason="invalid")


def _retry_after(value: str) -> float:
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0  # an HTTP date: rare here; a short wait is a safe reading


class RangeClient:
    """Ranged GETs into buffers over per-thread keep-alive connections."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._local = threading.local()

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        pool: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "pool", {}
        )
        conn = pool.get((scheme, netloc))
        if conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = cls(netloc, timeout=self._timeout_s)
            pool[(scheme, netloc)] = conn
        return conn

    def _drop(self, scheme: str, netloc: str) -> None:
        conn = self._local.__dict__.get("pool", {}).pop((scheme, netloc), None)
        if conn is not None:
            conn.close()

    def get_into(
        self,
        url: str,
        start: int,
        buf: memoryview,
        headers: Mapping[str, str] | None = None,
        *,
        auth: str | None = None,
        authorize: Callable[[str], str | None] | None = None,
    ) -> str | None:
        """Fill ``buf`` with ``len(buf)`` bytes of ``url`` from ``start``.

        ``auth`` is sent as Authorization to the original host only (never after a redirect to
        another host). On a 401, ``authorize(challenge)`` may supply a new header, tried once;
        the header that worked is returned so the caller can reuse it."""
        length = len(buf)
        origin = urlsplit(url).netloc
        answered = False
        for _ in range(MAX_REDIRECTS + 2):
            parts = urlsplit(url)
            scheme, netloc = parts.scheme, parts.netloc
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            send = {**(headers or {}), "Range": f"bytes={start}-{start + length - 1}"}
            if auth and netloc == origin:
                send["Authorization"] = auth
            conn = self._connection(scheme, netloc)
            try:
                conn.request("GET", path, headers=send)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(scheme, netloc)
                raise SourceError(
                    f"GET {_safe(url)}: {exc}", reason="network", retryable=True
                ) from exc
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                resp.read()
                url = urljoin(url, resp.getheader("Location", ""))
                continue
            if resp.status == 401 and authorize is not None and not answered:
                challenge = resp.getheader("WWW-Authenticate", "")
                resp.read()
                answered = True
                auth = authorize(challenge)
                if auth is not None:
                    continue
                raise status_error(401, None, b"", f"GET {_safe(url)}")
            if resp.status >= 400:
                body = resp.read(300)
                self._drop(scheme, netloc)
                raise status_error(
                    resp.status, resp.getheader("Retry-After"), body, f"GET {_safe(url)}"
                )
            if resp.status not in (200, 206):
                self._drop(scheme, netloc)
                raise SourceError(
                    f"GET {_safe(url)}: unexpected HTTP {resp.status}", reason="invalid"
                )
            self._fill(resp, scheme, netloc, url, start, buf)
            return auth
        raise SourceError(f"GET {_safe(url)}: too many redirects", reason="invalid")

    def _fill(
        self,
        resp: http.client.HTTPResponse,
        scheme: str,
        netloc: str,
        url: str,
        start: int,
        buf: memoryview,
    ) -> None:
        length = len(buf)
        got = 0
        try:
            if resp.status == 200 and start:
                _discard(resp, start)  # the server ignored Range
            while got < length:
                n = resp.readinto(buf[got:])
                if not n:
                    break
                got += n
        except (OSError, http.client.HTTPException) as exc:
            self._drop(scheme, netloc)
            raise SourceError(
                f"GET {_safe(url)}: body cut short: {exc}", reason="truncated", retryable=True
            ) from exc
        if got < length:
            self._drop(scheme, netloc)
            raise SourceError(
                f"GET {_safe(url)}: body cut short at {got} of {length} bytes",
                reason="truncated",
                retryable=True,
            )
        if not resp.isclosed():
            # A 200 carries the rest of the object: this connection cannot be reused.
            self._drop(scheme, netloc)


def _discard(resp: http.client.HTTPResponse, n: int) -> None:
    while n:
        data = resp.read(min(n, 1 << 20))
        if not data:
            return
        n -= len(data)


def _safe(url: str) -> str:
    """A URL for messages: without its query string, which may carry a signature."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
