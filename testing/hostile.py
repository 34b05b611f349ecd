"""A small scriptable HTTP server that records what it is sent: a foreign token realm, a CDN
that challenges, an S3 endpoint that refuses credentials, a token endpoint with a huge answer.

Each request is recorded (method, path, Authorization header) and answered by the server's
``respond`` callable, which writes a whole answer through :class:`Answer`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from weightcache.testing.tls import ServerCert


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    authorization: str


@dataclass
class Answer:
    """What a responder sends: a status, headers and a body of ``body`` then ``filler`` bytes."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    filler: int = 0


Responder = Callable[[Seen], Answer]


@dataclass
class HostileServer:
    host: str
    scheme: str
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def authorizations(self) -> list[str]:
        with self.lock:
            return [s.authorization for s in self.seen]


def challenge(realm: str) -> Responder:
    """Every request: 401 with a Bearer challenge naming ``realm``."""
    return lambda seen: Answer(
        401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="cdn"'}, b"{}"
    )


def s3_error(status: int, code: str) -> Responder:
    """Every request: an S3 XML error."""
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>no</Message></Error>"
    return lambda seen: Answer(status, {"Content-Type": "application/xml"}, body.encode())


def huge_token(size: int) -> Responder:
    """A token endpoint whose JSON answer is ``size`` bytes long."""
    head = b'{"token": "'
    return lambda seen: Answer(
        200, {"Content-Type": "application/json"}, head, max(0, size - len(head))
    )


@contextlib.contextmanager
def run_hostile(respond: Responder, tls: ServerCert | None = None) -> Iterator[HostileServer]:
    """Serve ``respond`` on a free 127.0.0.1 port (over TLS with ``tls``)."""
    server_state = HostileServer(host="", scheme="https" if tls else "http")
    closing = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._answer()

        def do_HEAD(self) -> None:
            self._answer()

        def _answer(self) -> None:
            seen = Seen(
                self.command, urlsplit(self.path).path, self.headers.get("Authorization", "")
            )
            with server_state.lock:
                server_state.seen.append(seen)
            answer = respond(seen)
            self.send_response(answer.status)
            for k, v in answer.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(answer.body) + answer.filler))
            self.end_headers()
            if self.command == "HEAD":
                return
            try:
                self.wfile.write(answer.body)
                chunk = b"x" * (1 << 16)
                left = answer.filler
                while left > 0 and not closing.is_set():
                    self.wfile.write(chunk[: min(left, len(chunk))])
                    left -= len(chunk)
            except OSError:
                self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.server_context().wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    server_state.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="hostile-server", daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        closing.set()
        server.shutdown()
        server.server_close()
        thread.join()
