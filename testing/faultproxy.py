"""A fault-injecting HTTP proxy in front of a real registry, for the bad-input tests.

It forwards every request to the upstream registry and counts the body bytes it relays. Rules,
matched in order against method and path, can answer with an error status (a number of times,
with a huge or endless body), redirect elsewhere, cut a body short, flip bytes in it, trickle it,
replace response headers (a lying ``Content-Range``, a wrong checksum), or demand auth (Basic,
or Bearer with a token endpoint served by the proxy itself, the way registries delegate to a
token service, or at a realm named elsewhere). It records the Authorization header of every
request, and serves plain HTTP or TLS.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import secrets
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from weightcache.testing.tls import ServerCert

_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}


@dataclass
class Rule:
    """What to do with requests whose path matches ``path`` (a regex) and ``method``."""

    path: str
    method: str = "GET"
    status: int | None = None
    """Answer with this status instead of forwarding."""
    headers: dict[str, str] = field(default_factory=dict)
    times: int = -1
    """How many requests the rule applies to; -1 means all."""
    truncate_at: int | None = None
    """Forward, but close the connection after this many body bytes."""
    flip_at: int | None = None
    """Forward, but invert the byte at this body offset."""
    range_from: int | None = None
    """Only match requests whose Range header starts at or after this offset."""
    before: Callable[[], None] | None = None
    """Run this (in the proxy's thread) before answering, e.g. to fill a disk or to block."""
    redirect: str | None = None
    """Answer 307 to this base URL followed by the request's path and query."""
    body_bytes: int | None = None
    """With ``status``: a body of this many filler bytes instead of the short JSON one; -1 sends
    an endless chunked body."""
    body: bytes | None = None
    """With ``status``: answer with exactly this body (a rogue registry's manifest, say)."""
    stall_after: int | None = None
    """Forward, but after this many body bytes send one byte per ``trickle_s`` seconds."""
    trickle_s: float = 1.0
    replace_headers: dict[str, str] = field(default_factory=dict)
    """Forward, but with these response headers instead of the upstream's."""
    hits: int = 0

    def matches(self, method: str, path: str, range_start: int) -> bool:
        if self.range_from is not None and range_start < self.range_from:
            return False
        return method == self.method and re.search(self.path, path) is not None and self.times != 0


@dataclass
class ProxyState:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    auth: str = ""
    """'' (none), 'basic' or 'bearer'."""
    username: str = "puller"
    password: str = "s3cret"
    tokens: set[str] = field(default_factory=set)
    realm: str = ""
    """The Bearer realm named in challenges; '' means the proxy's own ``/token``."""
    scheme: str = "http"
    forward_auth: bool = False
    """Pass the client's Authorization header upstream (an S3 endpoint behind the proxy)."""
    seen_auth: list[tuple[str, str]] = field(default_factory=list)
    """(path, Authorization header or '') of every request received."""
    closing: threading.Event = field(default_factory=threading.Event)
    bytes_relayed: int = 0
    blob_bytes_relayed: int = 0
    blob_bytes_by_path: dict[str, int] = field(default_factory=dict)
    """The same, per blob path (``/v2/REPO/blobs/sha256:...``)."""
    """Body bytes of blob responses only (what a fetch of model content cost)."""
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.rules.clear()
            self.realm = ""
            self.seen_auth.clear()
            self.bytes_relayed = 0
            self.blob_bytes_relayed = 0
            self.blob_bytes_by_path.clear()
            self.requests.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ProxyState

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _basic_ok(self) -> bool:
        header = self.headers.get("Authorization", "")
        expected = base64.b64encode(f"{self.state.username}:{self.state.password}".encode())
        return header == f"Basic {expected.decode()}"

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        st = self.state
        url = urlsplit(self.path)
        with st.lock:
            st.seen_auth.append((url.path, self.headers.get("Authorization", "")))
        if url.path == "/token":
            if not self._basic_ok():
                self._reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                return
            token = secrets.token_hex(16)
            with st.lock:
                st.tokens.add(token)
            scope = parse_qs(url.query).get("scope", [""])[0]
            self._reply(
                200,
                json.dumps({"token": token, "scope": scope}).encode(),
                {"Content-Type": "application/json"},
            )
            return
        if st.auth and url.path.startswith("/v2/") and not self._authorized():
            host = self.headers.get("Host", "")
            realm = st.realm or f"{st.scheme}://{host}/token"
            challenge = (
                f'Basic realm="{host}"'
                if st.auth == "basic"
                else f'Bearer realm="{realm}",service="test-registry"'
            )
            self._reply(
                401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge}
            )
            return
        rule = self._rule(url.path)
        if rule is not None and rule.redirect is not None:
            with st.lock:
                st.requests.append((self.command, url.path, 307))
            self._reply(307, b"", {"Location": rule.redirect.rstrip("/") + self.path})
            return
        if rule is not None and rule.status is not None:
            with st.lock:
                st.requests.append((self.command, url.path, rule.status))
            if rule.body is not None:
                self._reply(rule.status, rule.body, rule.headers)
            elif rule.body_bytes is None:
                self._reply(rule.status, b'{"errors":[{"code":"INJECTED"}]}', rule.headers)
            else:
                self._filler(rule.status, rule.body_bytes, rule.headers)
            return
        self._forward(rule)

    def _filler(self, status: int, size: int, headers: dict[str, str]) -> None:
        """A body of ``size`` filler bytes (endless and chunked when -1), sent until the
        client hangs up."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if size < 0:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = b"x" * (1 << 16)
        try:
            if size < 0:
                while not self.state.closing.is_set():
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            while size > 0 and not self.state.closing.is_set():
                n = min(size, len(chunk))
                self.wfile.write(chunk[:n])
                size -= n
        except OSError:
            pass
        self.close_connection = True

    def _authorized(self) -> bool:
        if self.state.auth == "basic":
            return self._basic_ok()
        header = self.headers.get("Authorization", "")
        return header.startswith("Bearer ") and header[7:] in self.state.tokens

    def _rule(self, path: str) -> Rule | None:
        m = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
        range_start = int(m.group(1)) if m else 0
        chosen = None
        with self.state.lock:
            for rule in self.state.rules:
                if rule.matches(self.command, path, range_start):
                    rule.hits += 1
                    if rule.times > 0:
                        rule.times -= 1
                    chosen = rule
                    break
        if chosen is not None and chosen.before is not None:
            chosen.before()
        return chosen

    def _count(self, n: int) -> None:
        with self.state.lock:
            self.state.bytes_relayed += n
            if "/blobs/" in self.path:
                self.state.blob_bytes_relayed += n
                path = urlsplit(self.path).path
                self.state.blob_bytes_by_path[path] = self.state.blob_bytes_by_path.get(path, 0) + n

    def _forward(self, rule: Rule | None) -> None:
        st = self.state
        up = urlsplit(st.upstream)
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port or 80, timeout=60)
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in _HOP and (st.forward_auth or k.lower() != "authorization")
        }
        headers["Host"] = up.netloc
        try:
            conn.request(self.command, self.path, headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status)
            replaced = {k.lower() for k in (rule.replace_headers if rule else {})}
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() not in replaced:
                    self.send_header(k, v)
            for k, v in (rule.replace_headers if rule else {}).items():
                self.send_header(k, v)
            self.end_headers()
            with st.lock:
                st.requests.append((self.command, urlsplit(self.path).path, resp.status))
            if self.command == "HEAD":
                return
            sent = 0
            while chunk := resp.read(1 << 16):
                if (
                    rule is not None
                    and rule.flip_at is not None
                    and sent <= rule.flip_at < sent + len(chunk)
                ):
                    i = rule.flip_at - sent
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                if (
                    rule is not None
                    and rule.stall_after is not None
                    and sent + len(chunk) > rule.stall_after
                ):
                    self._trickle(chunk, max(0, rule.stall_after - sent), rule.trickle_s)
                    self.close_connection = True
                    return
                if (
                    rule is not None
                    and rule.truncate_at is not None
                    and sent + len(chunk) > rule.truncate_at
                ):
                    chunk = chunk[: rule.truncate_at - sent]
                    self.wfile.write(chunk)
                    self._count(len(chunk))
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
                self._count(len(chunk))
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True
        finally:
            conn.close()

    def _trickle(self, chunk: bytes, fast: int, every_s: float) -> None:
        """Send ``fast`` bytes of ``chunk``, then one byte per ``every_s`` seconds until the
        chunk is out, the client hangs up or the proxy closes."""
        self.wfile.write(chunk[:fast])
        self._count(fast)
        for i in range(fast, len(chunk)):
            if self.state.closing.wait(every_s):
                return
            self.wfile.write(chunk[i : i + 1])
            self.wfile.flush()
            self._count(1)


@dataclass(frozen=True)
class FaultProxy:
    host: str
    state: ProxyState

    @property
    def url(self) -> str:
        return f"{self.state.scheme}://{self.host}"


@contextlib.contextmanager
def run_fault_proxy(upstream: str, tls: ServerCert | None = None) -> Iterator[FaultProxy]:
    """Serve a fault-injecting proxy to ``upstream`` on a free 127.0.0.1 port, over TLS with
    ``tls`` when given."""
    state = ProxyState(upstream=upstream, scheme="https" if tls else "http")
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls is not None:
        # The handshake runs in the request's thread, so a silent client blocks nobody else.
        server.socket = tls.server_context().wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    thread = threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True)
    thread.start()
    try:
        yield FaultProxy(host=f"127.0.0.1:{server.server_address[1]}", state=state)
    finally:
        state.closing.set()
        server.shutdown()
        server.server_close()
        thread.join()
