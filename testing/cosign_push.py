"""Publishes cosign signature artifacts in the format cosign writes, signed with keys made by
``cryptography``: a simple signing payload blob per signature, the base64 signature in the
layer annotation, under the ``sha256-<hex>.sig`` tag or as a referrer (``subject`` set)."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from weightcache.testing.oci_push import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    RegistryPusher,
    sha256_digest,
)

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class Signer:
    key: PrivateKey

    @classmethod
    def ecdsa(cls) -> Signer:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def rsa(cls) -> Signer:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ed25519(cls) -> Signer:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @property
    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, payload: bytes) -> bytes:
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(payload, ec.ECDSA(hashes.SHA256()))
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
        return self.key.sign(payload)


def payload(digest: str, reference: str) -> bytes:
    """The simple signing payload cosign signs for ``reference`` at ``digest``."""
    doc = {
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Layer:
    """One signature: the payload bytes and the signature put in the annotation."""

    payload: bytes
    signature: bytes


def signed(signer: Signer, digest: str, reference: str) -> Layer:
    body = payload(digest, reference)
    return Layer(body, signer.sign(body))


class CosignPublisher:
    """Pushes signature manifests for manifests in one registry."""

    def __init__(self, pusher: RegistryPusher) -> None:
        self.pusher = pusher

    def signature_manifest(
        self, repo: str, layers: Sequence[Layer], subject: Descriptor | None = None
    ) -> dict[str, Any]:
        config = self.pusher.push_blob(repo, b"{}", "application/vnd.oci.image.config.v1+json")
        descriptors = [
            self.pusher.push_blob(
                repo,
                layer.payload,
                SIMPLE_SIGNING,
                {SIGNATURE_ANNOTATION: base64.b64encode(layer.signature).decode()},
            ).to_json()
            for layer in layers
        ]
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": descriptors,
        }
        if subject is not None:
            doc["artifactType"] = SIGNATURE_ARTIFACT
            doc["subject"] = subject.to_json()
        return doc

    def push_tag(self, repo: str, digest: str, manifest: dict[str, Any] | bytes) -> Descriptor:
        """Under cosign's tag schema, ``sha256-<hex>.sig``."""
        tag = digest.replace(":", "-", 1) + ".sig"
        return self.pusher.push_manifest(repo, tag, manifest, OCI_MANIFEST)

    def push_referrer(self, repo: str, manifest: dict[str, Any]) -> Descriptor:
        """By digest (no tag), for a referrers index to list."""
        body = json.dumps(manifest).encode()
        return self.pusher.push_manifest(repo, sha256_digest(body), body, OCI_MANIFEST)


def referrers_index(entries: Sequence[tuple[Descriptor, str]]) -> bytes:
    """An OCI 1.1 referrers answer listing (manifest descriptor, artifactType) pairs."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{**d.to_json(), "artifactType": t} for d, t in entries],
        }
    ).encode()
