"""``oci://`` references: OCI distribution v2 manifests and blobs.

A tag is resolved once to a manifest digest; everything after that is addressed by digest, so
mirrors serve it and the cache key never depends on a URL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

from weightcache.daemon.errors import DigestMismatch, SourceError, UnsupportedManifest
from weightcache.daemon.plan import ModelPlan
from weightcache.daemon.references import ModelRef, OciRef
from weightcache.daemon.sources.oci_formats import read_model
from weightcache.daemon.sources.oci_http import (
    MANIFEST_ACCEPT,
    MAX_MANIFEST_BYTES,
    Endpoint,
    RegistryHTTP,
)

T = TypeVar("T")


class OciSource:
    """Resolves and reads models in OCI registries."""

    def __init__(self, http: RegistryHTTP) -> None:
        self._http = http

    def _manifest(self, ref: OciRef, reference: str) -> tuple[bytes, str, str]:
        """Fetch a manifest; return (body, media type, digest), checking a pinned digest."""

        def get(endpoint: Endpoint) -> tuple[bytes, str]:
            resp = self._http.request(
                ref,
                endpoint,
                "GET",
                endpoint.url(ref, f"manifests/{reference}"),
                {"Accept": MANIFEST_ACCEPT},
                stream=True,
            )
            try:
                length = int(resp.headers.get("Content-Length") or 0)
                if length > MAX_MANIFEST_BYTES:
                    raise UnsupportedManifest(f"{ref}: manifest of {length} bytes is too large")
                body = resp.read(MAX_MANIFEST_BYTES + 1)
            finally:
                resp.release_conn()
            if len(body) > MAX_MANIFEST_BYTES:
                raise UnsupportedManifest(f"{ref}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
            return body, resp.headers.get("Content-Type", "").split(";")[0].strip()

        resolving = not reference.startswith("sha256:")
        body, content_type = self._http.first_success(ref, resolving, get, f"{ref} manifest")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if not resolving and digest != reference:
            raise DigestMismatch(f"{ref}: manifest bytes hash to {digest}, not {reference}")
        return body, content_type, digest

    def resolve(self, ref: ModelRef) -> ModelPlan:
        assert isinstance(ref, OciRef)
        body, content_type, digest = self._manifest(ref, ref.reference)
        digest, fmt, items = read_model(
            body, content_type, digest, lambda d: self._manifest(ref, d), str(ref)
        )
        return ModelPlan(ref=ref, digest=digest, format=fmt, items=items)

    def read_into(
        self, ref: ModelRef, locator: str, version: str, start: int, buf: memoryview
    ) -> None:
        assert isinstance(ref, OciRef)
        if not len(buf):
            return
        self._http.first_success(
            ref,
            False,
            lambda ep: self._http.read_into(ref, ep, ep.url(ref, f"blobs/{locator}"), start, buf),
            f"{ref} blob {locator}",
        )

    # -- small artifacts beside a model (signatures) -------------------------------------------

    def manifest_if_any(
        self, ref: OciRef, reference: str, max_bytes: int
    ) -> tuple[bytes, str] | None:
        """A manifest by tag or digest in ``ref``'s repository as (body, media type), or None
        when the registry has none (404). At most ``max_bytes`` are read; a larger one raises
        UnsupportedManifest, bytes that do not hash to a requested digest DigestMismatch."""

        def get(endpoint: Endpoint) -> tuple[bytes, str]:
            resp = self._http.request(
                ref,
                endpoint,
                "GET",
                endpoint.url(ref, f"manifests/{reference}"),
                {"Accept": MANIFEST_ACCEPT},
                max_body=max_bytes,
            )
            if len(resp.data) > max_bytes:
                raise UnsupportedManifest(
                    f"{ref}: manifest {reference} larger than {max_bytes} bytes"
                )
            return resp.data, resp.headers.get("Content-Type", "").split(";")[0].strip()

        resolving = not reference.startswith("sha256:")
        found = _unless_absent(
            lambda: self._http.first_success(ref, resolving, get, f"{ref} manifest {reference}")
        )
        if found is not None and not resolving:
            digest = "sha256:" + hashlib.sha256(found[0]).hexdigest()
            if digest != reference:
                raise DigestMismatch(f"{ref}: manifest bytes hash to {digest}, not {reference}")
        return found

    def referrers_if_any(self, ref: OciRef, digest: str, max_bytes: int) -> bytes | None:
        """The OCI 1.1 referrers index of ``digest`` (``GET /v2/<name>/referrers/<digest>``),
        or None when the registry does not serve the API (404: use the tag schema instead)."""

        def get(endpoint: Endpoint) -> bytes:
            resp = self._http.request(
                ref,
                endpoint,
                "GET",
                endpoint.url(ref, f"referrers/{digest}"),
                {"Accept": "application/vnd.oci.image.index.v1+json"},
                max_body=max_bytes,
            )
            if len(resp.data) > max_bytes:
                raise UnsupportedManifest(
                    f"{ref}: referrers index of {digest} larger than {max_bytes} bytes"
                )
            return resp.data

        return _unless_absent(
            lambda: self._http.first_success(ref, False, get, f"{ref} referrers of {digest}")
        )

    def small_blob(self, ref: OciRef, digest: str, max_bytes: int) -> bytes:
        """A whole blob of at most ``max_bytes``, checked against ``digest``."""

        def get(endpoint: Endpoint) -> bytes:
            resp = self._http.request(
                ref, endpoint, "GET", endpoint.url(ref, f"blobs/{digest}"), {}, max_body=max_bytes
            )
            if len(resp.data) > max_bytes:
                raise UnsupportedManifest(f"{ref}: blob {digest} larger than {max_bytes} bytes")
            return resp.data

        data = self._http.first_success(ref, False, get, f"{ref} blob {digest}")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatch(f"{ref}: blob bytes hash to {actual}, not {digest}")
        return data


def _unless_absent(op: Callable[[], T]) -> T | None:
    """``op()``, or None when the registry answered 404."""
    try:
        return op()
    except SourceError as exc:
        if exc.reason == "not_found":
            return None
        raise
