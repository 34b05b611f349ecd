"""cosign signatures through the signing rules: an oci:// model without model.sig is verified
by the cosign signature of its manifest (the ``sha256-<hex>.sig`` tag, pushed to the real
registry in the format cosign writes) against the rule's public keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_config
from test_signing import files_of, rule, with_rules

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.references import parse_reference
from weightcache.daemon.signing import SignatureInvalid, SignatureStatus
from weightcache.daemon.store.states import ModelState
from weightcache.daemon.store.store import Store
from weightcache.testing.cosign_push import CosignPublisher, Signer, signed
from weightcache.testing.models import ModelPublisher
from weightcache.testing.oci_push import RegistryPusher
from weightcache.testing.services import Registry


def test_cosign_signed_manifest_is_verified_and_another_key_refused(
    registry: Registry, publisher: ModelPublisher, pusher: RegistryPusher, tmp_path: Path
) -> None:
    team, other = Signer.ecdsa(), Signer.ecdsa()
    trusted = tmp_path / "team.pub"
    trusted.write_bytes(team.public_pem)
    cosign = CosignPublisher(pusher)
    good = publisher.oras("signed/cosign", "v1", files_of(60))
    bad = publisher.oras("signed/cosign", "v2", files_of(61))
    for desc, signer in ((good, team), (bad, other)):
        layer = signed(signer, desc.digest, f"{registry.host}/signed/cosign")
        cosign.push_tag(
            "signed/cosign", desc.digest, cosign.signature_manifest("signed/cosign", [layer])
        )
    config = with_rules(make_config(tmp_path / "store"), rule("require", keys=(trusted,)))
    fetcher = build_fetcher(config, Store(config.store))
    try:
        row = fetcher.warm(parse_reference(f"oci://{registry.host}/signed/cosign:v1"))
        assert (row.state, row.signature, row.signature_scheme) == (
            ModelState.READY,
            SignatureStatus.VERIFIED,
            "cosign",
        )
        with pytest.raises(SignatureInvalid):
            fetcher.warm(parse_reference(f"oci://{registry.host}/signed/cosign:v2"))
        refused = fetcher.store.model(bad.digest)
        assert refused is not None and refused.state == ModelState.FAILED
        assert refused.signature == SignatureStatus.INVALID
    finally:
        fetcher.close()
        fetcher.store.close()
