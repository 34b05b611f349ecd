"""cosign signatures of OCI manifests, key-based and offline.

Where a signature is looked for (both places; any signature that verifies is enough):

- the OCI 1.1 referrers API, ``GET /v2/<name>/referrers/<digest>``: index entries whose
  ``artifactType`` is cosign's signature type; a 404 means the registry does not serve it;
- cosign's tag schema, ``<name>:sha256-<hex>.sig``.

A signature manifest's layers of type ``application/vnd.dev.cosign.simplesigning.v1+json`` are
"simple signing" payloads; the layer annotation ``dev.cosignproject.cosign/signature`` holds the
base64 signature of the payload's bytes. A payload counts only when its
``critical.image.docker-manifest-digest`` is the manifest being trusted. The
``docker-reference`` is not compared: a signed manifest copied to a mirror or another
repository keeps its signature, as with cosign itself.

Everything read from the registry is bounded and type-checked; a malformed or oversized
artifact is INVALID with a reason, never an internal error. Registry failures other than 404
(network, 5xx, auth) raise :class:`SourceError`: they say nothing about the signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from weightcache.daemon.config import ConfigError
from weightcache.daemon.errors import DigestMismatch, SourceError, UnsupportedManifest
from weightcache.daemon.references import OciRef
from weightcache.daemon.signing import Scheme, SignatureResult, SignatureStatus

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)

MAX_SIGNATURE_MANIFEST = 256 * 1024
"""A signature manifest with a few layers and their bundle annotations is a few KiB."""
MAX_REFERRERS_INDEX = 1024 * 1024
MAX_LAYERS = 32
"""Signature layers looked at per manifest; cosign appends one per signing."""
MAX_REFERRERS = 16
"""Cosign signature referrers looked at per manifest."""
MAX_PAYLOAD = 64 * 1024
"""A simple signing payload is a few hundred bytes; optional claims make it larger."""
MAX_SIGNATURE_B64 = 8 * 1024


class CosignSource(Protocol):
    """What the verifier reads from the registry (:class:`~weightcache.daemon.sources.oci.
    OciSource` implements it with the configured credentials, mirrors and bounds)."""

    def manifest_if_any(
        self, ref: OciRef, reference: str, max_bytes: int
    ) -> tuple[bytes, str] | None:
        """(body, media type) of a manifest by tag or digest; None on 404."""
        ...

    def referrers_if_any(self, ref: OciRef, digest: str, max_bytes: int) -> bytes | None:
        """The referrers index of ``digest``; None when the registry does not serve it."""
        ...

    def small_blob(self, ref: OciRef, digest: str, max_bytes: int) -> bytes:
        """A blob of at most ``max_bytes``, checked against ``digest``."""
        ...


@dataclass(frozen=True)
class _Key:
    fingerprint: str
    key: Any


def key_fingerprint(pem: bytes) -> str:
    """The first 16 hex digits of sha256 over the key's DER SubjectPublicKeyInfo: what is
    recorded as the signer. Raises ConfigError for bytes that are not a PEM public key."""
    return _load(pem).fingerprint


def _load(pem: bytes) -> _Key:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"a cosign key is not a PEM public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise ConfigError(f"a cosign key of type {type(key).__name__} is not supported")
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _Key(hashlib.sha256(der).hexdigest()[:16], key)


def _verifies(key: Any, signature: bytes, payload: bytes) -> bool:
    """cosign's defaults: ECDSA and RSA PKCS#1 v1.5 over SHA-256, pure Ed25519."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, payload)
    except InvalidSignature:
        return False
    return True


class _Malformed(Exception):
    """An artifact that is not what cosign writes; the message says what, for a tenant."""


def _sig_tag(digest: str) -> str:
    return digest.replace(":", "-", 1) + ".sig"


def verify_cosign(
    source: CosignSource, ref: OciRef, manifest_digest: str, public_keys: Sequence[bytes]
) -> SignatureResult:
    """The cosign verdict for ``manifest_digest`` in ``ref``'s repository: VERIFIED by the
    first trusted key that verifies a payload naming this digest, UNSIGNED when neither the
    referrers API nor the ``.sig`` tag holds a signature, INVALID otherwise (the detail says
    why the first failing signature failed)."""
    keys = [_load(pem) for pem in public_keys]
    if not keys:
        raise ConfigError("cosign verification needs at least one trusted public key")
    if not manifest_digest.startswith("sha256:") or len(manifest_digest) != 71:
        raise ValueError(f"not a sha256 manifest digest: {manifest_digest!r}")
    failures: list[str] = []
    found = False
    for where, manifest in _signature_manifests(source, ref, manifest_digest, failures):
        found = True
        try:
            layers = _signature_layers(manifest, manifest_digest)
        except _Malformed as exc:
            failures.append(f"{where}: {exc}")
            continue
        for layer in layers:
            found = True
            try:
                signer = _check_layer(source, ref, manifest_digest, layer, keys)
            except _Malformed as exc:
                failures.append(f"{where}: {exc}")
                continue
            return SignatureResult(SignatureStatus.VERIFIED, Scheme.COSIGN, signer=signer)
    if not found and not failures:
        return SignatureResult(
            SignatureStatus.UNSIGNED,
            Scheme.COSIGN,
            detail=f"no cosign signature for {manifest_digest}",
        )
    detail = failures[0] if failures else "the signature artifact holds no signature"
    if len(failures) > 1:
        detail += f" (and {len(failures) - 1} more)"
    return SignatureResult(SignatureStatus.INVALID, Scheme.COSIGN, detail=detail)


def _signature_manifests(
    source: CosignSource, ref: OciRef, digest: str, failures: list[str]
) -> list[tuple[str, Any]]:
    """(where, parsed manifest) of every candidate signature manifest; what cannot be read
    as one is added to ``failures``."""
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    try:
        index = source.referrers_if_any(ref, digest, MAX_REFERRERS_INDEX)
        referred = [] if index is None else _cosign_referrers(index)
    except (_Malformed, UnsupportedManifest) as exc:
        failures.append(f"referrers of {digest}: {exc}")
        referred = []
    for sig_digest in referred:
        where = f"referrer {sig_digest}"
        seen.add(sig_digest)
        try:
            got = source.manifest_if_any(ref, sig_digest, MAX_SIGNATURE_MANIFEST)
            if got is None:
                raise _Malformed("listed by the referrers API but absent")
            doc = _manifest_json(*got)
            subject = doc.get("subject")
            if not isinstance(subject, dict) or subject.get("digest") != digest:
                raise _Malformed("its subject is not the signed manifest")
        except (_Malformed, UnsupportedManifest, DigestMismatch) as exc:
            failures.append(f"{where}: {exc}")
            continue
        out.append((where, doc))
    tag = _sig_tag(digest)
    try:
        got = source.manifest_if_any(ref, tag, MAX_SIGNATURE_MANIFEST)
        if got is not None:
            body_digest = "sha256:" + hashlib.sha256(got[0]).hexdigest()
            if body_digest not in seen:  # the same manifest may be a referrer and tagged
                out.append((f"tag {tag}", _manifest_json(*got)))
    except (_Malformed, UnsupportedManifest) as exc:
        failures.append(f"tag {tag}: {exc}")
    return out


def _cosign_referrers(body: bytes) -> list[str]:
    doc = _json_object(body, "the referrers index")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise _Malformed("the referrers index has no manifests list")
    out: list[str] = []
    for entry in manifests:
        if not isinstance(entry, dict) or entry.get("artifactType") != SIGNATURE_ARTIFACT:
            continue
        d = entry.get("digest")
        if not _is_digest(d):
            raise _Malformed("a referrer has no valid sha256 digest")
        if d not in out:
            out.append(d)
        if len(out) >= MAX_REFERRERS:
            break
    return out


def _manifest_json(body: bytes, media_type: str) -> Any:
    doc = _json_object(body, "the signature manifest")
    declared = doc.get("mediaType", media_type)
    if declared not in MANIFEST_TYPES and media_type not in MANIFEST_TYPES:
        raise _Malformed(f"the signature manifest is of type {str(declared)[:80]!r}")
    return doc


def _signature_layers(doc: Any, digest: str) -> list[dict[str, Any]]:
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise _Malformed("the signature manifest has no layers list")
    if len(layers) > MAX_LAYERS:
        raise _Malformed(f"the signature manifest has {len(layers)} layers (at most {MAX_LAYERS})")
    out = [
        layer
        for layer in layers
        if isinstance(layer, dict) and layer.get("mediaType") == SIMPLE_SIGNING
    ]
    if not out:
        raise _Malformed("the signature manifest has no simple signing layer")
    return out


def _check_layer(
    source: CosignSource,
    ref: OciRef,
    digest: str,
    layer: dict[str, Any],
    keys: Sequence[_Key],
) -> str:
    """The fingerprint of the key that verifies this layer; raises _Malformed saying why
    none does."""
    blob, size = layer.get("digest"), layer.get("size")
    if not _is_digest(blob):
        raise _Malformed("a signature layer has no valid sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_PAYLOAD:
        raise _Malformed(f"a signature layer's size is not between 1 and {MAX_PAYLOAD} bytes")
    annotations = layer.get("annotations")
    encoded = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
    if not isinstance(encoded, str) or not encoded or len(encoded) > MAX_SIGNATURE_B64:
        raise _Malformed(f"a signature layer has no {SIGNATURE_ANNOTATION} annotation")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Malformed("a signature annotation is not base64") from exc
    try:
        payload = source.small_blob(ref, blob, size)
    except (UnsupportedManifest, DigestMismatch) as exc:
        raise _Malformed(f"payload {blob}: {exc}") from exc
    except SourceError as exc:
        if exc.reason != "not_found":
            raise
        raise _Malformed(f"payload {blob} is absent from the registry") from exc
    if len(payload) != size:
        raise _Malformed(f"payload {blob} is {len(payload)} bytes, not {size}")
    signer = next((k.fingerprint for k in keys if _verifies(k.key, signature, payload)), None)
    if signer is None:
        raise _Malformed("no trusted key verifies the signature")
    # Only a payload a trusted key signed is read: its claims are the signer's.
    claims = _json_object(payload, "the signed payload")
    critical = claims.get("critical")
    if not isinstance(critical, dict):
        raise _Malformed("the signed payload has no critical section")
    if critical.get("type") != PAYLOAD_TYPE:
        raise _Malformed(f"the signed payload's type is not {PAYLOAD_TYPE!r}")
    image, identity = critical.get("image"), critical.get("identity")
    if not isinstance(identity, dict) or not isinstance(identity.get("docker-reference"), str):
        raise _Malformed("the signed payload has no identity.docker-reference")
    signed = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(signed, str):
        raise _Malformed("the signed payload has no image.docker-manifest-digest")
    if signed != digest:
        raise _Malformed(f"the signature is for manifest {signed[:80]}, not {digest}")
    return signer


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Malformed(f"{what} is not JSON") from exc
    if not isinstance(doc, dict):
        raise _Malformed(f"{what} is not a JSON object")
    return doc


def _is_digest(value: object) -> TypeGuard[str]:
    if not isinstance(value, str) or not value.startswith("sha256:") or len(value) != 71:
        return False
    return all(c in "0123456789abcdef" for c in value[7:])
