"""HTTP for the OCI distribution API: endpoints (mirrors first), auth challenges, error mapping.

- Plain HTTP only for loopback hosts and hosts configured as insecure; HTTPS otherwise.
- Mirrors are tried before the origin, like containerd's hosts.toml: for content addressed by
  digest always, for tag resolution only when the mirror has the ``resolve`` capability. A
  failing (or stalled) mirror falls through to the next endpoint.
- 401 challenges: ``Bearer`` (token from the realm) and ``Basic``. Credentials are chosen by the
  endpoint that challenged: the origin's (docker config.json entry of the registry) go only to
  the origin and its token realm, a mirror's (the entry of the mirror's ``host[:port]``) only to
  that mirror and its realm. A realm on plain http is refused unless the endpoint is itself
  plain http and loopback or configured insecure. A challenge from a redirect target is never
  answered, and no credential or token follows a redirect to another host or from https to
  http (:mod:`weightcache.daemon.sources.ranges`). Credentials are never logged.
- Every read is bounded: manifests and token answers in size and by an overall deadline, error
  bodies in size, blob ranges by the stall rule.
- Status codes map to :class:`SourceError` reasons; 429 and 503 honour ``Retry-After``.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlencode, urlsplit

from weightcache.daemon.config import Mirror, RegistryConfig
from weightcache.daemon.errors import SourceError
from weightcache.daemon.references import OciRef
from weightcache.daemon.sources.ranges import Limits, RangeClient, Reply, tls_context

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
MAX_TOKEN_BYTES = 256 * 1024
"""A token endpoint's answer is refused beyond this (real ones are a few KiB)."""
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


def _host(netloc: str) -> str:
    """The host of ``host[:port]`` (brackets kept off an IPv6 literal)."""
    return urlsplit(f"//{netloc}").hostname or netloc


def _basic(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


class Response:
    """A registry's answer with its body already read, bounded by ``max_body``."""

    def __init__(self, reply: Reply) -> None:
        self.status = reply.status
        self.headers: http.client.HTTPMessage = reply.headers
        self.data = reply.body
        self._offset = 0

    def read(self, amt: int | None = None) -> bytes:
        end = len(self.data) if amt is None else self._offset + amt
        out = self.data[self._offset : end]
        self._offset += len(out)
        return out

    def release_conn(self) -> None:
        """Nothing to release: the connection went back to its pool when the body was read."""


class RegistryHTTP:
    """Authenticated, mirror-aware requests to OCI registries."""

    def __init__(
        self,
        config: RegistryConfig,
        credentials: Mapping[str, Credentials],
        timeout_s: float,
        pool_size: int = 16,
        *,
        limits: Limits | None = None,
    ) -> None:
        """``pool_size`` is unused: connections are kept one per thread and host. ``limits``
        defaults to the configuration's defaults with ``timeout_s``. ``credentials`` is read at
        each use, so a mapping that follows its file (``credentials.DockerConfigFile``) hands
        out rotated credentials without a restart."""
        self._config = config
        self._credentials = credentials
        self._tokens: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._client = RangeClient(limits or Limits.default(timeout_s), tls_context(config.ca_file))

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

    def _insecure_ok(self, netloc: str) -> bool:
        """May credentials and tokens for this ``host[:port]`` travel over plain http?"""
        return is_loopback(_host(netloc)) or netloc in self._config.insecure

    def credentials_for(self, ref: OciRef, endpoint: Endpoint) -> Credentials | None:
        """The origin's credentials for the origin; a mirror's own for a mirror."""
        if endpoint.mirror:
            return self._credentials.get(urlsplit(endpoint.base).netloc)
        return self._credentials.get(ref.registry)

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
        max_body: int = MAX_MANIFEST_BYTES,
    ) -> Response:
        """Send a request, answering one auth challenge from the endpoint; map failures to
        SourceError. The body is read before returning, at most ``max_body + 1`` bytes, all
        within the request deadline (``stream`` changes nothing)."""
        key = (endpoint.base, ref.repository)
        reply = self._client.fetch(
            method,
            url,
            headers,
            max_body=max_body,
            auth=self._tokens.get(key),
            authorize=lambda challenge: self.authorization(ref, endpoint, challenge),
        )
        self._remember(key, reply.auth)
        return Response(reply)

    def _remember(self, key: tuple[str, str], auth: str | None) -> None:
        if auth is not None:
            with self._lock:
                self._tokens[key] = auth

    def authorization(self, ref: OciRef, endpoint: Endpoint, challenge: str) -> str | None:
        """The Authorization header answering ``endpoint``'s 401 ``challenge`` (None: nothing
        to answer with). Raises SourceError for a realm that may not be used."""
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE.findall(params_text))
        creds = self.credentials_for(ref, endpoint)
        if scheme.lower() == "basic":
            return None if creds is None else _basic(creds)
        if scheme.lower() != "bearer" or "realm" not in params:
            return None
        realm = params["realm"]
        where = urlsplit(endpoint.base)
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SourceError(
                f"{endpoint.base} names a token realm that is not an http(s) URL", reason="auth"
            )
        if parts.scheme == "http" and (
            where.scheme != "http" or not self._insecure_ok(where.netloc)
        ):
            raise SourceError(
                f"{endpoint.base} names a token realm on plain http "
                f"({parts.scheme}://{parts.netloc}{parts.path}); credentials and tokens go over "
                "plain http only for registries configured insecure",
                reason="auth",
            )
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:pull"}
        if "service" in params:
            query["service"] = params["service"]
        url = f"{realm}{'&' if parts.query else '?'}{urlencode(query)}"
        what = f"token request to {parts.scheme}://{parts.netloc}{parts.path}"
        reply = self._client.fetch(
            "GET",
            url,
            {"Accept": "application/json"},
            max_body=MAX_TOKEN_BYTES,
            auth=None if creds is None else _basic(creds),
        )
        if len(reply.body) > MAX_TOKEN_BYTES:
            raise SourceError(f"{what}: answer larger than {MAX_TOKEN_BYTES} bytes", reason="auth")
        try:
            doc = json.loads(reply.body)
            token = doc.get("token") or doc["access_token"]
            if not isinstance(token, str) or not token or "\n" in token or "\r" in token:
                raise ValueError("not a token")
        except (ValueError, KeyError, AttributeError) as exc:
            raise SourceError(f"{what}: answered without a token", reason="auth") from exc
        return f"Bearer {token}"

    def read_into(
        self,
        ref: OciRef,
        endpoint: Endpoint,
        url: str,
        start: int,
        buf: memoryview,
        size: int | None = None,
    ) -> None:
        """GET ``len(buf)`` bytes of a blob from ``start`` straight into ``buf``, answering
        one auth challenge from the endpoint and remembering the token for the repository.
        ``size``, the blob's length when known, is checked against ``Content-Range``."""
        key = (endpoint.base, ref.repository)
        token = self._client.get_into(
            url,
            start,
            buf,
            auth=self._tokens.get(key),
            authorize=lambda challenge: self.authorization(ref, endpoint, challenge),
            size=size,
        )
        self._remember(key, token)


def _mirror_endpoint(m: Mirror) -> Endpoint:
    base = m.url.rstrip("/")
    return Endpoint(base, mirror=True, api_prefix="" if m.override_path else "/v2")
