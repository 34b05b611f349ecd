"""OpenSSF Model Signing: verify a ``model.sig`` bundle and compare the per-file digests it
signs with the sha256 the store recorded during the fetch.

The signature's own bytes are all that is read: the library checks the bundle (key or
certificate chain, DSSE envelope, in-toto statement, the manifest's root digest) and hands back
the signed manifest, and the manifest is compared with the index's ``path -> sha256``, so a
model of any size costs one small file. Only the ``files`` serialization with sha256 can be
compared that way; a ``shards`` or blake2 signature would need the weights hashed again and is
refused as INVALID with that reason.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from weightcache.daemon.config import ConfigError
from weightcache.daemon.signing import (
    SIGNATURE_FILE,
    Scheme,
    SignatureResult,
    SignatureStatus,
)

GIT_PATHS = (".git/", ".gitattributes", ".github/", ".gitignore")
"""Paths the OMS tooling never signs (``model_signing.hashing.Config``'s default)."""


@dataclass(frozen=True)
class TrustedKey:
    name: str
    """The key's file name: what ``ls`` shows as the signer."""
    fingerprint: str
    verifier: Any
    """``model_signing``'s elliptic-key verifier for this key."""


@dataclass(frozen=True)
class TrustedChains:
    names: tuple[str, ...]
    fingerprint: str
    verifier: Any
    """``model_signing``'s certificate verifier over every configured chain file."""


class TrustError(ConfigError):
    """A configured key or certificate file cannot be used (read once, at start-up)."""


def load_key(path: Path) -> TrustedKey | None:
    """The key at ``path`` for OMS; None for a PEM public key of another kind (RSA, Ed25519:
    cosign may use it, OMS signs with elliptic keys only)."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise TrustError(f"cannot read public key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TrustError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    try:
        # Imported here: it costs about 0.9 s, which every command would pay otherwise.
        from model_signing._signing import sign_ec_key

        verifier = sign_ec_key.Verifier(path)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"{path}: an elliptic curve OMS does not support: {exc}") from exc
    return TrustedKey(path.name, hashlib.sha256(pem).hexdigest(), verifier)


def load_chains(paths: Sequence[Path]) -> TrustedChains | None:
    if not paths:
        return None
    h = hashlib.sha256()
    try:
        for path in paths:
            h.update(path.read_bytes())
        from model_signing._signing import sign_certificate

        verifier = sign_certificate.Verifier(list(paths))
    except OSError as exc:
        raise TrustError(f"cannot read certificate chain: {exc}") from exc
    except ValueError as exc:
        raise TrustError(f"certificate chains {[str(p) for p in paths]}: {exc}") from exc
    return TrustedChains(tuple(p.name for p in paths), h.hexdigest(), verifier)


def verify_oms(
    signature: Path,
    files: Mapping[str, str],
    keys: Sequence[TrustedKey],
    chains: TrustedChains | None,
    now: datetime.datetime | None = None,
) -> SignatureResult:
    """Verify the bundle at ``signature`` against ``keys`` and ``chains``; ``files`` is the
    model's ``path -> sha256`` as the store recorded it (``model.sig`` included or not)."""

    def invalid(detail: str, signer: str = "") -> SignatureResult:
        return SignatureResult(SignatureStatus.INVALID, Scheme.OMS, signer, detail)

    try:
        from model_signing._signing import sign_sigstore_pb

        bundle = sign_sigstore_pb.Signature.read(signature)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError):
        return invalid(f"{SIGNATURE_FILE} is not an OMS signature bundle")
    material = bundle.bundle.verification_material
    if material.x509_certificate_chain and material.x509_certificate_chain.certificates:
        if chains is None:
            return invalid("signed with a certificate, and the rule trusts no certificate chain")
        expired = _expired(material.x509_certificate_chain.certificates[0].raw_bytes, now)
        if expired:
            return invalid(expired)
        candidates: list[tuple[str, Any]] = [(",".join(chains.names), chains.verifier)]
    else:
        candidates = [(k.name, k.verifier) for k in keys]
        if not candidates:
            return invalid("signed with a key, and the rule trusts no public key")
    failures = []
    for name, verifier in candidates:
        try:
            manifest = verifier.verify(bundle)
        except Exception as exc:  # any failure of the library's checks is a refusal
            failures.append(f"{name}: {type(exc).__name__}")
            continue
        return _compare(manifest, files, name)
    return invalid("no trusted key or certificate verifies it (" + "; ".join(failures) + ")")


def _expired(der: bytes, now: datetime.datetime | None) -> str:
    """Why the signing certificate is not valid now, or ''. The library checks the chain at
    the certificate's own issue time; with no trusted timestamp to prove when the model was
    signed, the node also wants the certificate valid today."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return "the signing certificate cannot be read"
    at = now or datetime.datetime.now(datetime.UTC)
    if at > cert.not_valid_after_utc:
        return f"the signing certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if at < cert.not_valid_before_utc:
        return "the signing certificate is not valid yet"
    return ""


def _compare(manifest: Any, files: Mapping[str, str], signer: str) -> SignatureResult:
    serialization = manifest.serialization_type
    if serialization.get("method") != "files" or serialization.get("hash_type") != "sha256":
        return SignatureResult(
            SignatureStatus.INVALID,
            Scheme.OMS,
            signer,
            "the signature uses "
            f"{serialization.get('method')}/{serialization.get('hash_type')} serialization; the "
            "node checks files/sha256 signatures (model_signing's default) against its index",
        )
    ignored = tuple(GIT_PATHS) + tuple(str(p) for p in serialization.get("ignore_paths", ()))
    signed = {
        str(rd.identifier): (rd.digest.algorithm, rd.digest.digest_hex)
        for rd in manifest.resource_descriptors()
    }
    held = {
        path: sha.removeprefix("sha256:")
        for path, sha in files.items()
        if path != SIGNATURE_FILE and not _ignored(path, ignored)
    }
    problems = []
    extra = sorted(set(held) - set(signed))
    missing = sorted(set(signed) - set(held))
    if extra:
        problems.append(f"not signed: {', '.join(extra[:5])}")
    if missing:
        problems.append(f"signed but absent: {', '.join(missing[:5])}")
    changed = sorted(p for p in set(held) & set(signed) if signed[p] != ("sha256", held[p]))
    if changed:
        problems.append(f"changed: {', '.join(changed[:5])}")
    if problems:
        return SignatureResult(SignatureStatus.INVALID, Scheme.OMS, signer, "; ".join(problems))
    return SignatureResult(SignatureStatus.VERIFIED, Scheme.OMS, signer)


def _ignored(path: str, ignored: Sequence[str]) -> bool:
    for entry in ignored:
        entry = entry.rstrip("/")
        if path == entry or path.startswith(entry + "/"):
            return True
    return False
