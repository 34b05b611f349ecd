"""A small OCI distribution v2 client for publishing test content: blobs and manifests.

It speaks the registry's HTTP API directly (monolithic upload: POST then PUT ``?digest=``) so the
tests exercise the same bytes a real ``oras push`` or ``kit push`` would put there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import urllib3

from weightcache.daemon.hashing import sha256_file

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
_CHUNK = 1 << 20


class PushError(RuntimeError):
    """The registry refused a push; the message carries its status and body."""


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryPusher:
    """Pushes blobs and manifests into one registry over plain HTTP or HTTPS."""

    def __init__(self, base_url: str, headers: Mapping[str, str] | None = None) -> None:
        self._base = base_url.rstrip("/")
        self._headers = dict(headers or {})
        self._http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(total=600))

    def _check(self, resp: urllib3.BaseHTTPResponse, what: str, *expected: int) -> None:
        if resp.status not in expected:
            body = resp.data[:500].decode(errors="replace")
            raise PushError(f"{what}: HTTP {resp.status}: {body}")

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self._http.request(
            "HEAD", f"{self._base}/v2/{repo}/blobs/{digest}", headers=self._headers
        )
        return resp.status == 200

    def push_blob(
        self,
        repo: str,
        content: bytes | Path,
        media_type: str,
        annotations: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Upload ``content`` (bytes or a file, streamed) unless already present."""
        if isinstance(content, Path):
            digest, size = sha256_file(content)
        else:
            digest, size = sha256_digest(content), len(content)
        if not self.blob_exists(repo, digest):
            start = self._http.request(
                "POST", f"{self._base}/v2/{repo}/blobs/uploads/", headers=self._headers
            )
            self._check(start, f"start upload to {repo}", 202)
            location = urljoin(self._base + "/", start.headers["Location"])
            sep = "&" if "?" in location else "?"
            headers = {
                **self._headers,
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            }
            if isinstance(content, Path):
                with content.open("rb") as body:
                    resp = self._http.request(
                        "PUT", f"{location}{sep}digest={digest}", body=body, headers=headers
                    )
            else:
                resp = self._http.request(
                    "PUT", f"{location}{sep}digest={digest}", body=content, headers=headers
                )
            self._check(resp, f"upload blob {digest} to {repo}", 201)
        return Descriptor(media_type, digest, size, annotations)

    def push_manifest(
        self, repo: str, reference: str, manifest: Mapping[str, Any] | bytes, media_type: str
    ) -> Descriptor:
        """PUT a manifest under a tag or digest; returns its descriptor."""
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        resp = self._http.request(
            "PUT",
            f"{self._base}/v2/{repo}/manifests/{reference}",
            body=body,
            headers={**self._headers, "Content-Type": media_type},
        )
        self._check(resp, f"push manifest {repo}:{reference}", 201)
        digest = sha256_digest(body)
        returned = resp.headers.get("Docker-Content-Digest")
        if returned is not None and returned != digest:
            raise PushError(f"registry reported digest {returned} for manifest {digest}")
        return Descriptor(media_type, digest, len(body))

    def get_blob(self, repo: str, digest: str) -> bytes:
        resp = self._http.request(
            "GET", f"{self._base}/v2/{repo}/blobs/{digest}", headers=self._headers
        )
        self._check(resp, f"get blob {repo}@{digest}", 200)
        return resp.data

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str]:
        """Return a manifest's bytes and content type."""
        resp = self._http.request(
            "GET",
            f"{self._base}/v2/{repo}/manifests/{reference}",
            headers={**self._headers, "Accept": MANIFEST_ACCEPT},
        )
        self._check(resp, f"get manifest {repo}:{reference}", 200)
        return resp.data, resp.headers.get("Content-Type", "")
