"""cosign signatures of OCI manifests against the real registry: the ``.sig`` tag schema, and
the referrers API answered by the fault proxy in front of it (Debian's registry 2.8 does not
serve ``/referrers/``)."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass

import pytest

from weightcache.daemon.config import ConfigError, RegistryConfig
from weightcache.daemon.errors import SourceError
from weightcache.daemon.references import OciRef, parse_reference
from weightcache.daemon.signing import Scheme, SignatureStatus
from weightcache.daemon.signing.cosign import key_fingerprint, verify_cosign
from weightcache.daemon.sources.oci import OciSource
from weightcache.daemon.sources.oci_http import Credentials, RegistryHTTP
from weightcache.testing.cosign_push import (
    SIGNATURE_ARTIFACT,
    SIMPLE_SIGNING,
    CosignPublisher,
    Layer,
    Signer,
    payload,
    referrers_index,
    signed,
)
from weightcache.testing.faultproxy import FaultProxy, Rule
from weightcache.testing.oci_push import OCI_MANIFEST, Descriptor, RegistryPusher
from weightcache.testing.services import Registry


@dataclass(frozen=True)
class Model:
    repo: str
    descriptor: Descriptor

    @property
    def digest(self) -> str:
        return self.descriptor.digest


@pytest.fixture
def source() -> OciSource:
    return OciSource(RegistryHTTP(RegistryConfig(), {}, timeout_s=10))


@pytest.fixture
def cosign(pusher: RegistryPusher) -> CosignPublisher:
    return CosignPublisher(pusher)


@pytest.fixture
def model(pusher: RegistryPusher) -> Model:
    repo = f"cosign/{uuid.uuid4().hex[:12]}"
    config = pusher.push_blob(repo, b"{}", "application/vnd.oci.image.config.v1+json")
    layer = pusher.push_blob(repo, uuid.uuid4().bytes * 64, "application/octet-stream")
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json()],
    }
    return Model(repo, pusher.push_manifest(repo, "v1", manifest, OCI_MANIFEST))


def ref_of(host: str, model: Model) -> OciRef:
    ref = parse_reference(f"oci://{host}/{model.repo}:v1")
    assert isinstance(ref, OciRef)
    return ref


@pytest.fixture
def signer() -> Signer:
    return Signer.ecdsa()


def test_good_signature_under_the_tag_is_verified(
    registry: Registry, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(registry.host, model)
    manifest = cosign.signature_manifest(model.repo, [signed(signer, model.digest, str(ref))])
    cosign.push_tag(model.repo, model.digest, manifest)
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.VERIFIED
    assert result.scheme is Scheme.COSIGN
    assert result.signer == key_fingerprint(signer.public_pem)
    assert len(result.signer) == 16


@pytest.mark.parametrize("make", [Signer.rsa, Signer.ed25519], ids=["rsa", "ed25519"])
def test_rsa_and_ed25519_keys_verify(
    registry: Registry, source: OciSource, cosign: CosignPublisher, model: Model, make: object
) -> None:
    assert callable(make)
    signer: Signer = make()
    ref = ref_of(registry.host, model)
    cosign.push_tag(
        model.repo,
        model.digest,
        cosign.signature_manifest(model.repo, [signed(signer, model.digest, str(ref))]),
    )
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.VERIFIED
    assert result.signer == key_fingerprint(signer.public_pem)


def test_unsigned_manifest(
    registry: Registry, source: OciSource, model: Model, signer: Signer
) -> None:
    result = verify_cosign(source, ref_of(registry.host, model), model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.UNSIGNED
    assert result.scheme is Scheme.COSIGN


def test_signature_by_an_untrusted_key_is_invalid(
    registry: Registry, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(registry.host, model)
    other = Signer.ecdsa()
    cosign.push_tag(
        model.repo,
        model.digest,
        cosign.signature_manifest(model.repo, [signed(other, model.digest, str(ref))]),
    )
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert "no trusted key" in result.detail
    assert result.signer == ""


def test_signature_over_another_manifest_is_invalid(
    registry: Registry, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(registry.host, model)
    elsewhere = "sha256:" + "ab" * 32
    # A valid signature of another model, replayed under this model's .sig tag.
    cosign.push_tag(
        model.repo,
        model.digest,
        cosign.signature_manifest(model.repo, [signed(signer, elsewhere, str(ref))]),
    )
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert elsewhere in result.detail


def test_tampered_payload_is_invalid(
    registry: Registry, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(registry.host, model)
    good = signed(signer, model.digest, str(ref))
    tampered = Layer(
        good.payload.replace(b'"optional":null', b'"optional":{"a":"b"}'), good.signature
    )
    assert tampered.payload != good.payload
    cosign.push_tag(model.repo, model.digest, cosign.signature_manifest(model.repo, [tampered]))
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert "no trusted key" in result.detail


def test_one_trusted_signature_among_several_is_enough(
    registry: Registry, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(registry.host, model)
    other = Signer.ecdsa()
    layers = [signed(other, model.digest, str(ref)), signed(signer, model.digest, str(ref))]
    cosign.push_tag(model.repo, model.digest, cosign.signature_manifest(model.repo, layers))
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.VERIFIED
    assert result.signer == key_fingerprint(signer.public_pem)
    # With neither key trusted, the same artifact is invalid.
    third = Signer.ecdsa()
    assert verify_cosign(source, ref, model.digest, [third.public_pem]).status is (
        SignatureStatus.INVALID
    )


def test_second_trusted_key_verifies(
    registry: Registry, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(registry.host, model)
    cosign.push_tag(
        model.repo,
        model.digest,
        cosign.signature_manifest(model.repo, [signed(signer, model.digest, str(ref))]),
    )
    keys = [Signer.ed25519().public_pem, signer.public_pem]
    result = verify_cosign(source, ref, model.digest, keys)
    assert result.status is SignatureStatus.VERIFIED
    assert result.signer == key_fingerprint(signer.public_pem)


def _layer(
    signer: Signer, body: bytes, *, size: int | None = None, sig: str | None = None
) -> dict[str, object]:
    from weightcache.testing.oci_push import sha256_digest

    return {
        "mediaType": SIMPLE_SIGNING,
        "digest": sha256_digest(body),
        "size": len(body) if size is None else size,
        "annotations": {
            "dev.cosignproject.cosign/signature": (
                base64.b64encode(signer.sign(body)).decode() if sig is None else sig
            )
        },
    }


MALFORMED = {
    "not json": lambda s, d, b: b"{not json",
    "a list": lambda s, d, b: b"[]",
    "layers not a list": lambda s, d, b: json.dumps({"layers": {"a": 1}}).encode(),
    "no simple signing layer": lambda s, d, b: json.dumps(
        {"layers": [{"mediaType": "application/octet-stream", "digest": d, "size": 1}]}
    ).encode(),
    "too many layers": lambda s, d, b: json.dumps({"layers": [_layer(s, b)] * 33}).encode(),
    "size a string": lambda s, d, b: json.dumps({"layers": [_layer(s, b, size="1")]}).encode(),  # type: ignore[arg-type]
    "oversized payload": lambda s, d, b: json.dumps(
        {"layers": [_layer(s, b, size=10 * 1024 * 1024)]}
    ).encode(),
    "signature not base64": lambda s, d, b: json.dumps(
        {"layers": [_layer(s, b, sig="!!not base64!!")]}
    ).encode(),
    "size lies": lambda s, d, b: json.dumps({"layers": [_layer(s, b, size=len(b) + 5)]}).encode(),
    "payload absent": lambda s, d, b: json.dumps(
        {"layers": [_layer(s, b + b" ")]}  # a blob the registry never received
    ).encode(),
    "oversized manifest": lambda s, d, b: json.dumps(
        {"layers": [_layer(s, b)], "pad": "x" * (300 * 1024)}
    ).encode(),
}


MALFORMED_DETAIL = {
    "not json": "not JSON",
    "a list": "not a JSON object",
    "layers not a list": "no layers list",
    "no simple signing layer": "no simple signing layer",
    "too many layers": "33 layers",
    "size a string": "size is not between",
    "oversized payload": "size is not between",
    "signature not base64": "not base64",
    "size lies": "bytes, not",
    "payload absent": "absent from the registry",
    "oversized manifest": "larger than",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_signature_artifacts_are_invalid(
    proxy: FaultProxy,
    source: OciSource,
    pusher: RegistryPusher,
    model: Model,
    signer: Signer,
    case: str,
) -> None:
    # The real registry refuses to store most of these, so a hostile registry (the proxy)
    # serves the .sig manifest; the payload blobs come from the real one behind it.
    ref = ref_of(proxy.host, model)
    body = payload(model.digest, str(ref))
    pusher.push_blob(model.repo, body, SIMPLE_SIGNING)
    tag = model.digest.replace(":", "-") + ".sig"
    proxy.state.rules.append(
        Rule(
            path=rf"/manifests/{tag}$",
            status=200,
            body=MALFORMED[case](signer, model.digest, body),
            headers={"Content-Type": OCI_MANIFEST},
        )
    )
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID, result
    assert MALFORMED_DETAIL[case] in result.detail, result.detail


@pytest.mark.parametrize(
    "claims",
    [
        {"critical": "x"},
        {"critical": {"type": "other", "image": {}, "identity": {"docker-reference": "r"}}},
        {"critical": {"type": "cosign container image signature", "identity": {}}},
        {
            "critical": {
                "type": "cosign container image signature",
                "identity": {"docker-reference": "r"},
                "image": {"docker-manifest-digest": 5},
            }
        },
    ],
    ids=["critical-not-object", "wrong-type", "no-identity", "digest-not-string"],
)
def test_signed_but_malformed_payload_is_invalid(
    registry: Registry,
    source: OciSource,
    cosign: CosignPublisher,
    model: Model,
    signer: Signer,
    claims: dict[str, object],
) -> None:
    ref = ref_of(registry.host, model)
    body = json.dumps(claims).encode()
    cosign.push_tag(
        model.repo,
        model.digest,
        cosign.signature_manifest(model.repo, [Layer(body, signer.sign(body))]),
    )
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert "payload" in result.detail


def test_unusable_keys_are_a_config_error(
    registry: Registry, source: OciSource, model: Model
) -> None:
    ref = ref_of(registry.host, model)
    with pytest.raises(ConfigError, match="not a PEM public key"):
        verify_cosign(source, ref, model.digest, [b"-----BEGIN PUBLIC KEY-----\nxx\n"])
    with pytest.raises(ConfigError, match="at least one"):
        verify_cosign(source, ref, model.digest, [])


def test_registry_failure_is_a_source_error_not_a_verdict(
    proxy: FaultProxy, source: OciSource, model: Model, signer: Signer
) -> None:
    proxy.state.rules.append(Rule(path=r"/manifests/sha256-", status=503))
    with pytest.raises(SourceError):
        verify_cosign(source, ref_of(proxy.host, model), model.digest, [signer.public_pem])


# -- the referrers API -------------------------------------------------------------------------


def test_registry_does_not_serve_referrers_so_the_tag_is_used(
    proxy: FaultProxy, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(proxy.host, model)
    cosign.push_tag(
        model.repo,
        model.digest,
        cosign.signature_manifest(model.repo, [signed(signer, model.digest, str(ref))]),
    )
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.VERIFIED
    asked = [(path, status) for _, path, status in proxy.state.requests if "referrers" in path]
    assert asked and all(status == 404 for _, status in asked)


def _serve_referrers(proxy: FaultProxy, model: Model, index: bytes) -> None:
    proxy.state.rules.append(
        Rule(
            path=rf"/v2/{model.repo}/referrers/{model.digest}$",
            status=200,
            body=index,
            headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
        )
    )


def test_good_signature_as_a_referrer_is_verified(
    proxy: FaultProxy, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(proxy.host, model)
    manifest = cosign.signature_manifest(
        model.repo, [signed(signer, model.digest, str(ref))], subject=model.descriptor
    )
    sig = cosign.push_referrer(model.repo, manifest)
    other = Descriptor(OCI_MANIFEST, "sha256:" + "cd" * 32, 10)
    _serve_referrers(
        proxy, model, referrers_index([(other, "application/spdx+json"), (sig, SIGNATURE_ARTIFACT)])
    )
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.VERIFIED
    assert result.signer == key_fingerprint(signer.public_pem)
    # No .sig tag exists: the referrer alone verified it, and the SBOM entry was not read.
    paths = [path for _, path, _ in proxy.state.requests]
    assert not any(other.digest in p for p in paths)


def test_referrer_whose_subject_is_another_manifest_is_invalid(
    proxy: FaultProxy,
    source: OciSource,
    cosign: CosignPublisher,
    model: Model,
    signer: Signer,
) -> None:
    ref = ref_of(proxy.host, model)
    elsewhere = Descriptor(OCI_MANIFEST, "sha256:" + "ef" * 32, 100)
    manifest = cosign.signature_manifest(
        model.repo, [signed(signer, model.digest, str(ref))], subject=elsewhere
    )
    sig = cosign.push_referrer(model.repo, manifest)
    _serve_referrers(proxy, model, referrers_index([(sig, SIGNATURE_ARTIFACT)]))
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert "subject" in result.detail


@pytest.mark.parametrize(
    "index",
    [
        b"<html>",
        b'{"manifests": 3}',
        json.dumps(
            {"manifests": [{"artifactType": SIGNATURE_ARTIFACT, "digest": "sha256:zz"}]}
        ).encode(),
    ],
    ids=["not-json", "manifests-not-list", "bad-digest"],
)
def test_malformed_referrers_index_is_invalid_unless_the_tag_verifies(
    proxy: FaultProxy,
    source: OciSource,
    cosign: CosignPublisher,
    model: Model,
    signer: Signer,
    index: bytes,
) -> None:
    ref = ref_of(proxy.host, model)
    _serve_referrers(proxy, model, index)
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert "referrers" in result.detail
    cosign.push_tag(
        model.repo,
        model.digest,
        cosign.signature_manifest(model.repo, [signed(signer, model.digest, str(ref))]),
    )
    assert verify_cosign(source, ref, model.digest, [signer.public_pem]).status is (
        SignatureStatus.VERIFIED
    )


def test_oversized_referrers_index_is_invalid(
    proxy: FaultProxy, source: OciSource, model: Model, signer: Signer
) -> None:
    proxy.state.rules.append(
        Rule(path=rf"/referrers/{model.digest}$", status=200, body_bytes=2 * 1024 * 1024)
    )
    result = verify_cosign(source, ref_of(proxy.host, model), model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert "larger than" in result.detail


def test_not_a_digest_is_refused(registry: Registry, source: OciSource, model: Model) -> None:
    ref = ref_of(registry.host, model)
    with pytest.raises(ValueError, match="not a sha256 manifest digest"):
        verify_cosign(source, ref, "v1", [Signer.ecdsa().public_pem])


def test_payload_blob_larger_than_its_descriptor_is_invalid(
    proxy: FaultProxy, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(proxy.host, model)
    layer = signed(signer, model.digest, str(ref))
    cosign.push_tag(model.repo, model.digest, cosign.signature_manifest(model.repo, [layer]))
    blob = "sha256:" + hashlib.sha256(layer.payload).hexdigest()
    proxy.state.rules.append(Rule(path=rf"/blobs/{blob}$", status=200, body_bytes=8 * 1024 * 1024))
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert "larger than" in result.detail


def test_signature_behind_registry_auth_is_read_with_the_registry_credentials(
    proxy: FaultProxy, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(proxy.host, model)
    cosign.push_tag(
        model.repo,
        model.digest,
        cosign.signature_manifest(model.repo, [signed(signer, model.digest, str(ref))]),
    )
    proxy.state.auth = "bearer"
    anonymous = OciSource(RegistryHTTP(RegistryConfig(), {}, timeout_s=10))
    with pytest.raises(SourceError) as refused:
        verify_cosign(anonymous, ref, model.digest, [signer.public_pem])
    assert refused.value.reason == "auth"
    creds = {proxy.host: Credentials(proxy.state.username, proxy.state.password)}
    authed = OciSource(RegistryHTTP(RegistryConfig(), creds, timeout_s=10))
    result = verify_cosign(authed, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.VERIFIED


def test_referrer_listed_but_absent_is_invalid_and_a_tagged_referrer_counts_once(
    proxy: FaultProxy, source: OciSource, cosign: CosignPublisher, model: Model, signer: Signer
) -> None:
    ref = ref_of(proxy.host, model)
    missing = Descriptor(OCI_MANIFEST, "sha256:" + "01" * 32, 10)
    _serve_referrers(proxy, model, referrers_index([(missing, SIGNATURE_ARTIFACT)]))
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert "absent" in result.detail
    # One manifest, both a referrer and under the .sig tag, signed by an untrusted key: one
    # failure is reported, not two.
    proxy.state.reset()
    bad = cosign.signature_manifest(
        model.repo, [signed(Signer.ecdsa(), model.digest, str(ref))], subject=model.descriptor
    )
    sig = cosign.push_referrer(model.repo, bad)
    cosign.push_tag(model.repo, model.digest, json.dumps(bad).encode())
    _serve_referrers(proxy, model, referrers_index([(sig, SIGNATURE_ARTIFACT)]))
    result = verify_cosign(source, ref, model.digest, [signer.public_pem])
    assert result.status is SignatureStatus.INVALID
    assert "more" not in result.detail
    assert result.detail.startswith(f"referrer {sig.digest}")
