"""The warm controller obeys the signing rule through the same Policy.authorize as publish: the
real controller over in-memory Kubernetes and catalog fakes, the real SignatureGate over a real
store holding models fetched from the real registry before the rule was tightened."""

from __future__ import annotations

from pathlib import Path

from helpers import make_config
from test_signing import Key, files_of, make_key, rule, sign, with_rules

from weightcache.app.wiring import build_fetcher, build_signatures
from weightcache.daemon.config import PolicyConfig, WarmConfig
from weightcache.daemon.errors import SourceError
from weightcache.daemon.kube.naming import WARM_ANNOTATION
from weightcache.daemon.kube.warm import WarmController
from weightcache.daemon.policy import Policy
from weightcache.daemon.references import parse_reference
from weightcache.daemon.signing import SignatureStatus
from weightcache.daemon.store.states import PinKind
from weightcache.daemon.store.store import Store
from weightcache.testing.fake_kube import deployment, node
from weightcache.testing.memory import ManualFetches, MemoryCatalog, MemoryKube
from weightcache.testing.models import ModelPublisher
from weightcache.testing.services import Registry

NODE = "gpu-1"


class _NoRegistry:
    def check(self, ref: object, manifest: str, secrets: object) -> None:
        raise SourceError("no registry in these tests", reason="network")


def _warm_once(
    store: Store, trusted: Key, ref: str
) -> tuple[list[tuple[str, str]], set[tuple[str, str]]]:
    """One reconcile pass of a Deployment warming ``ref`` under a require rule trusting
    ``trusted``; the (reason, message) of its events and its warm pins."""
    config = with_rules(make_config(store.layout.root), rule("require", keys=(trusted.public,)))
    catalog = MemoryCatalog()
    for row in store.models():
        catalog.add(row)
    kube = MemoryKube(node(NODE))
    policy = Policy(
        PolicyConfig(),
        access=_NoRegistry(),
        public=lambda ref, manifest: True,
        signatures=build_signatures(config, store),
    )
    controller = WarmController(
        NODE, kube, catalog, ManualFetches(catalog), WarmConfig(), policy, clock=lambda: 1e6
    )
    kube.put(deployment("llama", "team-a", annotations={WARM_ANNOTATION: ref}))
    for informer in controller.informers.values():
        informer.relist()
    controller.reconcile()
    events = [(str(e["reason"]), str(e["message"])) for e in kube.events]
    pins = {(m, h) for m, k, h in catalog.pins() if k == PinKind.WARM}
    return events, pins


def test_warm_refuses_what_a_tightened_rule_refuses_and_warms_what_it_verifies(
    registry: Registry, publisher: ModelPublisher, tmp_path: Path
) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    team, other = make_key(keys_dir, "team"), make_key(keys_dir, "other")
    publisher.oras("signed/warm", "v1", sign(files_of(50), team, tmp_path / "sig"))
    publisher.oras("signed/warm", "v2", files_of(51))
    signed_ref = f"oci://{registry.host}/signed/warm:v1"
    bare_ref = f"oci://{registry.host}/signed/warm:v2"
    config = with_rules(make_config(tmp_path / "store"), rule("off"))
    fetcher = build_fetcher(config, Store(config.store))
    try:
        signed = fetcher.warm(parse_reference(signed_ref))
        fetcher.warm(parse_reference(bare_ref))
        store = fetcher.store

        events, pins = _warm_once(store, other, signed_ref)
        assert pins == set()
        denied = [m for r, m in events if r == "WarmDenied"]
        assert len(denied) == 1 and "is invalid" in denied[0], events
        assert store.model(signed.digest).signature == SignatureStatus.INVALID  # type: ignore[union-attr]

        events, pins = _warm_once(store, team, bare_ref)
        assert pins == set()
        assert any(r == "WarmDenied" and "is unsigned" in m for r, m in events), events

        events, pins = _warm_once(store, team, signed_ref)
        assert pins == {(signed.digest, "Deployment/team-a/llama")}, events
        assert not any(r == "WarmDenied" for r, _ in events)
        row = store.model(signed.digest)
        assert row is not None and (row.signature, row.signature_scheme) == ("verified", "oms")
    finally:
        fetcher.close()
        fetcher.store.close()
