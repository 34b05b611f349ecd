"""``oci://`` references: OCI distribution v2 manifests and blobs.

A tag is resolved once to a manifest digest; everything after that is addressed by digest, so
mirrors serve it and the cache key never depends on a URL.
"""

from __future__ import annotations

import hashlib

from weightcache.daemon.errors import DigestMismatch, UnsupportedManifest
from weightcache.daemon.plan import ModelPlan
from weightcache.daemon.references import ModelRef, OciRef
from weightcache.daemon.sources.oci_formats import read_model
from weightcache.daemon.sources.oci_http import (
    MANIFEST_ACCEPT,
    MAX_MANIFEST_BYTES,
    Endpoint,
    RegistryHTTP,
)


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
