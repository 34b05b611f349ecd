"""Model signatures: OpenSSF Model Signing (``model.sig`` in the tree) and cosign signatures
of OCI manifests, verified against the keys a ``[[signing.rules]]`` entry trusts."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from weightcache.daemon.errors import WeightcacheError


class SignatureStatus(StrEnum):
    """What the node knows of a model's signature; stored with the model."""

    VERIFIED = "verified"
    """A signature by a trusted key, certificate or identity covers every file."""
    UNSIGNED = "unsigned"
    """No signature was found."""
    INVALID = "invalid"
    """A signature was found and did not verify (wrong key, changed file, other model...)."""
    UNCHECKED = "unchecked"
    """No rule asked for a check (``mode = "off"`` or no rule matched)."""


class Scheme(StrEnum):
    OMS = "oms"
    """OpenSSF Model Signing: a detached ``model.sig`` at the model's root."""
    COSIGN = "cosign"
    """A cosign signature of the OCI manifest (``sha256-<hex>.sig`` tag or a referrer)."""


@dataclass(frozen=True)
class SignatureResult:
    status: SignatureStatus
    scheme: Scheme | None = None
    signer: str = ""
    """Which trusted key, certificate or identity signed (a key's file name or fingerprint)."""
    detail: str = ""
    """Why it is not verified, in words a tenant may read (no node path, no remote body)."""


class SignatureInvalid(WeightcacheError):
    """A signature is present but does not verify against a trusted key for this model."""
