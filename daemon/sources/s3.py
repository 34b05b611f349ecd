"""``s3://bucket/prefix/``: every object under the prefix, relative paths kept.

The client comes from boto3's standard chain (``AWS_ENDPOINT_URL``, profile, IRSA), built once by
the caller. Every ranged read sends ``If-Match`` with the ETag seen at resolve time, so an object
replaced mid-fetch fails clearly instead of mixing two versions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from weightcache.daemon.errors import SourceError
from weightcache.daemon.plan import ModelPlan, RemoteFile, listing_digest, safe_relpath
from weightcache.daemon.references import ModelRef, S3Ref
from weightcache.daemon.sources.ranges import RangeClient

PRESIGN_SECONDS = 900

_RETRYABLE_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "503",
    "500",
}


class S3Source:
    """Resolves and reads models stored under S3 prefixes."""

    def __init__(self, client_factory: Callable[[], Any], timeout_s: float = 60.0) -> None:
        self._factory = client_factory
        self._ranges = RangeClient(timeout_s)
        self._made: Any = None
        self._lock = threading.Lock()

    @property
    def _client(self) -> Any:
        # Built on first use: creating a boto3 client costs time and needs no S3 reference.
        with self._lock:
            if self._made is None:
                self._made = self._factory()
            return self._made

    def resolve(self, ref: ModelRef) -> ModelPlan:
        assert isinstance(ref, S3Ref)
        items: list[RemoteFile] = []
        listing: list[tuple[str, int, str]] = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=ref.bucket, Prefix=ref.prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key: str = obj["Key"]
                    if key.endswith("/"):
                        continue  # a folder marker
                    rel = safe_relpath(key[len(ref.prefix) :], what=str(ref))
                    etag = str(obj.get("ETag", "")).strip('"')
                    size = int(obj["Size"])
                    items.append(RemoteFile(path=rel, size=size, locator=key, version=etag))
                    listing.append((rel, size, etag))
        except Exception as exc:
            raise _map_error(exc, f"{ref}: listing") from exc
        if not items:
            raise SourceError(f"{ref}: no objects under the prefix", reason="not_found")
        return ModelPlan(ref=ref, digest=listing_digest(listing), format="s3", items=items)

    def read_into(
        self, ref: ModelRef, locator: str, version: str, start: int, buf: memoryview
    ) -> None:
        assert isinstance(ref, S3Ref)
        if not len(buf):
            return
        # A presigned URL (signed locally, no request) lets the bytes go from the socket
        # straight into the buffer; botocore's body would copy every part once more.
        try:
            url = self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": ref.bucket, "Key": locator},
                ExpiresIn=PRESIGN_SECONDS,
            )
        except Exception as exc:
            raise _map_error(exc, f"s3://{ref.bucket}/{locator}") from exc
        headers = {"If-Match": f'"{version}"'} if version else {}
        self._ranges.get_into(url, start, buf, headers)


def _map_error(exc: Exception, what: str) -> Exception:
    """botocore errors -> SourceError with a stable reason."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = f"{what}: {code or status}: {err.get('Message', '')}".rstrip(": ")
        if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
            return SourceError(detail, reason="not_found")
        if code == "PreconditionFailed" or status == 412:
            return SourceError(
                f"{what}: object changed since the model was resolved", reason="changed"
            )
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status in (
            401,
            403,
        ):
            return SourceError(detail, reason="auth")
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return SourceError(
                detail, reason="throttled" if status == 429 else "server", retryable=True
            )
        return SourceError(detail, reason="invalid")
    if isinstance(exc, BotoCoreError):
        return SourceError(f"{what}: {exc}", reason="network", retryable=True)
    return exc
