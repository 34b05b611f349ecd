"""``s3://bucket/prefix/``: every object under the prefix, relative paths kept.

The client comes from boto3's standard chain (``AWS_ENDPOINT_URL``, profile, IRSA), built once by
the caller. Integrity, strongest first:

- An object with a whole-object SHA-256 checksum (S3 additional checksums, read with
  ``ChecksumMode=ENABLED``) announces it as the file's ``sha256``, which the fetcher verifies. A
  composite checksum (a multipart upload's checksum of part checksums, ``xxx-N`` or
  ``ChecksumType=COMPOSITE``) cannot be compared with a file's sha256 and counts as absent.
- Otherwise a single-part ETag of an object not encrypted with KMS or a customer key is the
  MD5 of its bytes (:func:`integrity`); a multipart ETag (``xxx-N``) is not.
- Otherwise the content is trusted as first fetched (logged at resolve).

Every ranged read is pinned: ``If-Match`` with the ETag seen at resolve time, and the version id
when the bucket is versioned, so an object replaced mid-fetch either fails clearly (``changed``)
or is read whole at the version resolved; never a mix of two versions. The answer's
``Content-Range``, size and ETag are checked (:mod:`weightcache.daemon.sources.ranges`).
Credential and permission errors are not retried and say what to fix.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from weightcache.daemon.errors import SourceError
from weightcache.daemon.plan import ModelPlan, RemoteFile, listing_digest, safe_relpath
from weightcache.daemon.references import ModelRef, S3Ref
from weightcache.daemon.sources.ranges import Limits, RangeClient

log = logging.getLogger(__name__)

PRESIGN_SECONDS = 900
HEADS_IN_PARALLEL = 8
"""Objects asked for their checksum at once while resolving."""

_RETRYABLE_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "503",
    "500",
}
_SINGLE_PART_ETAG = re.compile(r"[0-9a-f]{32}")
_FIX = {
    "AccessDenied": "the node's credentials may not read this: grant s3:ListBucket on the "
    "bucket and s3:GetObject on the prefix",
    "InvalidAccessKeyId": "the endpoint does not know the node's access key id: check "
    "AWS_ACCESS_KEY_ID (or the profile) and AWS_ENDPOINT_URL",
    "SignatureDoesNotMatch": "the secret key does not match the access key id: check "
    "AWS_SECRET_ACCESS_KEY (or the node's clock)",
    "ExpiredToken": "the session token has expired: refresh the node's credentials",
    "InvalidToken": "the session token is not valid: check AWS_SESSION_TOKEN",
}


@dataclass(frozen=True)
class Integrity:
    """What an object's metadata lets the fetcher verify its bytes against."""

    sha256: str | None
    """``sha256:<hex>`` of the whole object (an S3 whole-object SHA-256 checksum)."""
    md5: str | None
    """Hex MD5 of the whole object (a single-part ETag of an unencrypted or SSE-S3 object)."""

    @property
    def trusted_on_first_fetch(self) -> bool:
        return self.sha256 is None and self.md5 is None


def integrity(head: Mapping[str, Any], what: str) -> Integrity:
    """Read a ``head_object(..., ChecksumMode="ENABLED")`` answer."""
    etag = str(head.get("ETag", "")).strip('"')
    multipart = "-" in etag
    sha = None
    raw = head.get("ChecksumSHA256")
    kind = str(head.get("ChecksumType", "")).upper()
    # SHA-256 of a multipart upload is always composite on S3 unless it says FULL_OBJECT.
    composite = kind == "COMPOSITE" or (multipart and kind != "FULL_OBJECT")
    if isinstance(raw, str) and raw and "-" not in raw and not composite:
        try:
            digest = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SourceError(
                f"{what}: malformed ChecksumSHA256 {raw[:60]!r}", reason="invalid"
            ) from exc
        if len(digest) != 32:
            raise SourceError(f"{what}: ChecksumSHA256 is not 32 bytes", reason="invalid")
        sha = "sha256:" + digest.hex()
    encrypted = str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or bool(
        head.get("SSECustomerAlgorithm")
    )
    md5 = etag if not multipart and not encrypted and _SINGLE_PART_ETAG.fullmatch(etag) else None
    return Integrity(sha256=sha, md5=md5)


def pin(etag: str, version_id: str | None) -> str:
    """What :attr:`RemoteFile.version` holds: the ETag, then the version id after a space."""
    return f"{etag} {version_id}" if version_id else etag


def _unpin(version: str) -> tuple[str, str | None]:
    etag, _, version_id = version.partition(" ")
    return etag, version_id or None


@dataclass(frozen=True)
class _Listed:
    key: str
    rel: str
    size: int
    etag: str


class S3Source:
    """Resolves and reads models stored under S3 prefixes."""

    def __init__(
        self,
        client_factory: Callable[[], Any],
        timeout_s: float = 60.0,
        *,
        limits: Limits | None = None,
    ) -> None:
        """``limits`` defaults to the configuration's defaults with ``timeout_s``."""
        self._factory = client_factory
        self._ranges = RangeClient(limits or Limits.default(timeout_s))
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
        listed: list[_Listed] = []
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
                    listed.append(_Listed(key, rel, int(obj["Size"]), etag))
        except Exception as exc:
            raise _map_error(exc, f"{ref}: listing") from exc
        if not listed:
            raise SourceError(f"{ref}: no objects under the prefix", reason="not_found")
        with ThreadPoolExecutor(min(HEADS_IN_PARALLEL, len(listed))) as pool:
            items = list(pool.map(lambda obj: self._item(ref, obj), listed))
        tofu = sum(1 for _, trust in items if trust.sha256 is None)
        if tofu:
            log.warning(
                "%s: %d of %d objects carry no whole-object SHA-256 checksum; their content "
                "is trusted as first fetched",
                ref,
                tofu,
                len(items),
            )
        digest = listing_digest([(o.rel, o.size, o.etag) for o in listed])
        return ModelPlan(ref=ref, digest=digest, format="s3", items=[f for f, _ in items])

    def _item(self, ref: S3Ref, obj: _Listed) -> tuple[RemoteFile, Integrity]:
        what = f"s3://{ref.bucket}/{obj.key}"
        try:
            head = self._client.head_object(Bucket=ref.bucket, Key=obj.key, ChecksumMode="ENABLED")
        except Exception as exc:
            raise _map_error(exc, what) from exc
        etag = str(head.get("ETag", "")).strip('"')
        if etag != obj.etag or int(head.get("ContentLength", obj.size)) != obj.size:
            raise SourceError(
                f"{what}: changed while the prefix was being resolved",
                reason="changed",
                retryable=True,
            )
        trust = integrity(head, what)
        version_id = head.get("VersionId")
        version_id = version_id if isinstance(version_id, str) and version_id != "null" else None
        file = RemoteFile(
            path=obj.rel,
            size=obj.size,
            locator=obj.key,
            version=pin(etag, version_id),
            sha256=trust.sha256,
            md5=trust.md5,
        )
        return file, trust

    def read_into(
        self, ref: ModelRef, locator: str, version: str, start: int, buf: memoryview
    ) -> None:
        assert isinstance(ref, S3Ref)
        if not len(buf):
            return
        etag, version_id = _unpin(version)
        params = {"Bucket": ref.bucket, "Key": locator}
        if version_id:
            params["VersionId"] = version_id
        # A presigned URL (signed locally, no request) lets the bytes go from the socket
        # straight into the buffer; botocore's body would copy every part once more.
        try:
            url = self._client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=PRESIGN_SECONDS
            )
        except Exception as exc:
            raise _map_error(exc, f"s3://{ref.bucket}/{locator}") from exc
        headers = {"If-Match": f'"{etag}"'} if etag else {}
        self._ranges.get_into(url, start, buf, headers, etag=etag or None)


def _map_error(exc: Exception, what: str) -> Exception:
    """botocore errors -> SourceError with a stable reason."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        CredentialRetrievalError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, SourceError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = f"{what}: {code or status}: {err.get('Message', '')}".rstrip(": ")
        if code in _FIX:
            return SourceError(f"{what}: {code}: {_FIX[code]}", reason="auth")
        if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
            return SourceError(detail, reason="not_found")
        if code == "PreconditionFailed" or status == 412:
            return SourceError(
                f"{what}: object changed since the model was resolved", reason="changed"
            )
        if status in (401, 403):
            return SourceError(detail, reason="auth")
        if code in _RETRYABLE_CODES or status >= 500 or status == 429:
            return SourceError(
                detail, reason="throttled" if status == 429 else "server", retryable=True
            )
        return SourceError(detail, reason="invalid")
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return SourceError(
            f"{what}: {exc}: give the node agent AWS credentials (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, a profile, or a web identity role through IRSA)",
            reason="auth",
        )
    if isinstance(exc, BotoCoreError):
        return SourceError(f"{what}: {exc}", reason="network", retryable=True)
    return exc
