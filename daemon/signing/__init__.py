"""Model signatures: OpenSSF Model Signing (``model.sig`` in the tree) and cosign signatures
of OCI manifests, verified against the keys a ``[[signing.rules]]`` entry trusts."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from weightcache.daemon.errors import PolicyDenied
from weightcache.daemon.references import ModelRef
from weightcache.daemon.store.index import ModelRow


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


class SignatureInvalid(PolicyDenied):
    """A signature is present but does not verify against a trusted key for this model.

    A policy refusal (the warm controller treats it as one); the CSI code is its own."""


class SignatureMissing(PolicyDenied):
    """A ``require`` rule matches the model and it carries no signature."""


SIGNATURE_FILE = "model.sig"
"""Where an OMS signature lies in a model's tree."""


class SignatureCheck(Protocol):
    """The signing rules' one decision (real: ``gate.SignatureGate``): the fetcher asks before
    it installs a model, the policy at every publish and warm, so both obey the same rule."""

    def admit(self, ref: ModelRef, cached: ModelRow | None) -> None:
        """Raise ``SignatureMissing``/``SignatureInvalid`` when the rule refuses the cached
        model; it may verify it again."""
        ...

    def verify_fetch(self, ref: ModelRef, digest: str, paths: Collection[str]) -> SignatureResult:
        """Verify the files ``paths`` of model ``digest`` as the store committed them, record
        the result, and raise (:class:`SignatureMissing`, :class:`SignatureInvalid`) when the
        rule refuses the model."""
        ...
