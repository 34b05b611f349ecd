"""HTTP for the OCI distribution API: endpoints (mirrors first), auth challenges, error mapping.

- Plain HTTP only for loopback hosts and hosts configured as insecure; HTTPS otherwise.
- Mirrors are tried before the origin, like containerd's hosts.toml: for content addressed by
  digest always, for tag resolution only when the mirror has the ``resolve`` capability. A
  failing mirror falls through to the next endpoint.
- 401 challenges: ``Bearer`` (token from the realm, with the docker config.json credentials when
  present) and ``Basic``. Credentials are never logged.
- Status codes map to :class:`SourceError` reasons; 429 and 503 honour ``Retry-After``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlencode

import urllib3

from weightcache.daemon.config import Mirror, RegistryConfig
from weightcache.daemon.errors import SourceError
from weightcache.daemon.references import OciRef
from weightcache.daemon.sources.ranges import RangeClient, status_error

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Endpoint:
    """One place to send a request: a mirror or the origin registry."""

    base: str
    """``scheme://host[:port]`` plus a path prefix for mirrors with override_path."""
    mirror: bool
    api_prefix: str = "/v2"

    def url(self, ref: OciRef, tail: str) -> str:
        url = f"{self.base}{self.api_prefix}/{ref.repository}/{tail}"
        if self.mirror:
            url += "?" + urlencode({"ns": ref.registry})
        return url


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


def load_docker_config(path: Path | None) -> dict[str, Credentials]:
    """Registry host -> credentials from a docker ``config.json`` (``auths`` section)."""
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise SourceError(f"cannot read docker config {path}: {exc}", reason="auth") from exc
    return parse_docker_config(text, str(path))


def parse_docker_config(text: str, where: str) -> dict[str, Credentials]:
    """Registry host -> credentials from the text of a docker config (``.dockerconfigjson``)."""
    try:
        doc = json.loads(text)
        auths = doc.get("auths") or {}
        if not isinstance(auths, dict):
            raise ValueError("auths is not an object")
    except (ValueError, AttributeError) as exc:
        raise SourceError(f"docker config {where} is not valid: {exc}", reason="auth") from exc
    out: dict[str, Credentials] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        host = re.sub(r"^https?://", "", key).split("/", 1)[0]
        if host in ("index.docker.io", "registry-1.docker.io"):
            host = "docker.io"
        user, password = entry.get("username"), entry.get("password")
        if not isinstance(user, str | None) or not isinstance(password, str | None):
            raise SourceError(f"docker config {where}: malformed entry for {host}", reason="auth")
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, TypeError, AttributeError) as exc:
                raise SourceError(
                    f"docker config {where}: malformed auth for {host}", reason="auth"
                ) from exc
        elif entry.get("identitytoken"):
            user, password = "<token>", entry["identitytoken"]
        if user and password:
            out[host] = Credentials(user, password)
    return out


def is_loopback(host: str) -> bool:
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RegistryHTTP:
    """Authenticated, mirror-aware requests to OCI registries."""

    def __init__(
        self,
        config: RegistryConfig,
        credentials: Mapping[str, Credentials],
        timeout_s: float,
        pool_size: int = 16,
    ) -> None:
        self._config = config
        self._credentials = dict(credentials)
        self._http = urllib3.PoolManager(
            num_pools=32,
            maxsize=pool_size,
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5),
            timeout=urllib3.Timeout(connect=min(timeout_s, 10.0), read=timeout_s),
        )
        self._tokens: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._ranges = RangeClient(timeout_s)

    # -- endpoints -------------------------------------------------------------------------

    def _origin(self, ref: OciRef) -> Endpoint:
        plain = is_loopback(ref.host) or ref.registry in self._config.insecure
        return Endpoint(f"{'http' if plain else 'https'}://{ref.registry}", mirror=False)

    def endpoints(self, ref: OciRef, *, resolving: bool) -> list[Endpoint]:
        """Mirrors usable for this request, then the origin."""
        out = []
        for m in self._config.mirrors.get(ref.registry, ()):
            if resolving and not m.resolve:
                continue
            out.append(_mirror_endpoint(m))
        out.append(self._origin(ref))
        return out

    def first_success(
        self, ref: OciRef, resolving: bool, op: Callable[[Endpoint], T], what: str
    ) -> T:
        """Run ``op`` against each endpoint in order; a failing mirror falls through."""
        endpoints = self.endpoints(ref, resolving=resolving)
        for endpoint in endpoints[:-1]:
            try:
                return op(endpoint)
            except SourceError as exc:
                log.warning("%s: mirror %s failed (%s); trying the next", what, endpoint.base, exc)
        return op(endpoints[-1])

    # -- requests ----------------------------------------------------------------------------

    def request(
        self,
        ref: OciRef,
        endpoint: Endpoint,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        stream: bool = False,
    ) -> urllib3.BaseHTTPResponse:
        """Send a request, answering one auth challenge; map failures to SourceError."""
        key = (endpoint.base, ref.repository)
        send = dict(headers)
        token = self._tokens.get(key)
        if token:
            send["Authorization"] = token
        resp = self._send(method, url, send, stream)
        if resp.status == 401:
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.drain_conn()
            resp.release_conn()
            auth = self._answer(ref, endpoint, challenge)
            if auth is not None:
                with self._lock:
                    self._tokens[key] = auth
                send["Authorization"] = auth
                resp = self._send(method, url, send, stream)
        if resp.status >= 400:
            raise self._error(resp, f"{method} {url}")
        return resp

    def _send(
        self, method: str, url: str, headers: Mapping[str, str], stream: bool
    ) -> urllib3.BaseHTTPResponse:
        try:
            return self._http.request(
                method, url, headers=dict(headers), preload_content=not stream
            )
        except urllib3.exceptions.MaxRetryError as exc:
            raise SourceError(
                f"{method} {url}: {exc.reason}", reason="network", retryable=True
            ) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise SourceError(f"{method} {url}: {exc}", reason="network", retryable=True) from exc

    def _answer(self, ref: OciRef, endpoint: Endpoint, challenge: str) -> str | None:
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE.findall(params_text))
        creds = self._credentials.get(ref.registry)
        if scheme.lower() == "basic":
            if creds is None:
                return None
            return (
                "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            )
        if scheme.lower() != "bearer" or "realm" not in params:
            return None
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        headers = {}
        if creds is not None:
            basic = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            headers["Authorization"] = f"Basic {basic}"
        url = f"{params['realm']}?{urlencode(query)}"
        resp = self._send("GET", url, headers, stream=False)
        if resp.status != 200:
            raise self._error(resp, f"token request to {params['realm']}")
        try:
            doc = json.loads(resp.data)
            token = doc.get("token") or doc["access_token"]
        except (ValueError, KeyError) as exc:
            raise SourceError(
                f"token endpoint {params['realm']} answered without a token", reason="auth"
            ) from exc
        return f"Bearer {token}"

    @staticmethod
    def _error(resp: urllib3.BaseHTTPResponse, what: str) -> SourceError:
        body = (resp.data or b"")[:300]
        resp.release_conn()
        return status_error(resp.status, resp.headers.get("Retry-After"), body, what)

    def read_into(
        self, ref: OciRef, endpoint: Endpoint, url: str, start: int, buf: memoryview
    ) -> None:
        """GET ``len(buf)`` bytes of a blob from ``start`` straight into ``buf``, answering
        one auth challenge and remembering the token for the repository."""
        key = (endpoint.base, ref.repository)
        token = self._ranges.get_into(
            url,
            start,
            buf,
            auth=self._tokens.get(key),
            authorize=lambda challenge: self._answer(ref, endpoint, challenge),
        )
        if token is not None:
            with self._lock:
                self._tokens[key] = token


def _mirror_endpoint(m: Mirror) -> Endpoint:
    base = m.url.rstrip("/")
    return Endpoint(base, mirror=True, api_prefix="" if m.override_path else "/v2")
