"""The CSI node's decisions, fast: the real NodeService and policy over the in-memory catalog,
fetches and repairer, with the in-memory mount table over real directories. The handlers are
called directly (what the gRPC server would run); tests/test_csi_node.py and the conformance
suite drive the same service through the real socket, store and bind mounts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from csi_harness import publish, unpublish

from weightcache.csi.errors import AlreadyExists, FailedPrecondition
from weightcache.csi.mounter import FakeMounter, MountEntry
from weightcache.csi.node import NodeService
from weightcache.daemon.config import PolicyConfig
from weightcache.daemon.errors import (
    FetchInProgress,
    ModelCorrupt,
    NotCached,
    RepairFailed,
    SourceError,
)
from weightcache.daemon.policy import Policy
from weightcache.daemon.store.states import ModelState, PinKind
from weightcache.daemon.store.verify import ModelCheck, Problem
from weightcache.testing.memory import ManualFetches, MemoryCatalog, RecordingRepairs, model_row

REF = "oci://registry.example/team-a/llama:v1"
OTHER = "oci://registry.example/team-a/mistral:v1"
POD = {"csi.storage.k8s.io/pod.namespace": "team-a"}


@dataclass
class Node:
    service: NodeService
    catalog: MemoryCatalog
    fetches: ManualFetches
    repairs: RecordingRepairs
    mounter: FakeMounter
    kubelet: Path
    problems: dict[str, list[Problem]] = field(default_factory=dict)
    checked: list[tuple[str, bool]] = field(default_factory=list)

    def hold(self, ref: str, state: str = ModelState.READY) -> str:
        row = self.catalog.add(model_row(ref, state=state))
        self.catalog.model_path(row.digest).mkdir(parents=True, exist_ok=True)
        return row.digest

    def target(self, pod: str = "p1") -> Path:
        path = self.kubelet / "pods" / pod / "volumes" / "kubernetes.io~csi" / "model" / "mount"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, target: Path, ref: str = REF, **context: str) -> None:
        request = publish(ref, target, **POD, **context)
        asyncio.run(self.service.NodePublishVolume(request, None))  # type: ignore[arg-type]

    def unpublish(self, target: Path) -> None:
        asyncio.run(self.service.NodeUnpublishVolume(unpublish(target), None))  # type: ignore[arg-type]

    def mount_pins(self) -> set[tuple[str, str]]:
        return {(m, h) for m, k, h in self.catalog.pins() if k == PinKind.MOUNT}


@pytest.fixture
def n(tmp_path: Path) -> Node:
    catalog = MemoryCatalog(tmp_path / "store" / "models")
    catalog.models_dir.mkdir(parents=True)
    fetches = ManualFetches(catalog)
    repairs = RecordingRepairs()
    mounter = FakeMounter()
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    problems: dict[str, list[Problem]] = {}
    checked: list[tuple[str, bool]] = []

    def checks(digest: str, full: bool) -> ModelCheck:
        checked.append((digest, full))
        return ModelCheck(problems=list(problems.get(digest, [])))

    service = NodeService(
        "node-1",
        catalog,
        fetches,
        mounter,
        Policy(PolicyConfig(), access=_NoRegistry(), public=lambda ref, manifest: True),
        repairs,
        checks=checks,
        kubelet_dir=kubelet,
        publish_wait_s=0.0,
    )
    return Node(service, catalog, fetches, repairs, mounter, kubelet, problems, checked)


class _NoRegistry:
    def check(self, ref: object, manifest: str, secrets: object) -> None:
        raise SourceError("no registry in these tests", reason="network")


def test_a_ready_model_is_checked_pinned_and_bound_once(n: Node) -> None:
    digest = n.hold(REF)
    target = n.target()
    n.publish(target)
    n.publish(target)  # the kubelet's retry: nothing changes
    assert n.mounter.table[str(target)].root == str(n.catalog.model_path(digest))
    assert n.mount_pins() == {(digest, str(target))}
    assert n.checked == [(digest, False)]  # the retry found it published and checked nothing
    assert n.fetches.started == []


def test_full_verify_is_asked_of_the_checks(n: Node) -> None:
    digest = n.hold(REF)
    n.publish(n.target(), verify="full")
    assert n.checked == [(digest, True)]


def test_a_target_holding_another_model_is_refused(n: Node) -> None:
    n.hold(REF)
    n.hold(OTHER)
    target = n.target()
    n.publish(target)
    with pytest.raises(AlreadyExists):
        n.publish(target, OTHER)
    assert len(n.mount_pins()) == 1


def test_a_failed_check_refuses_unpins_reports_and_repairs(n: Node) -> None:
    digest = n.hold(REF)
    n.problems[digest] = [Problem(digest, "weights.bin", "ab" * 32, "size 3, expected 5")]
    target = n.target()
    with pytest.raises(ModelCorrupt, match=r"weights\.bin: size 3"):
        n.publish(target)
    assert n.mount_pins() == set() and n.mounter.table == {}
    assert not target.exists(), "the target it made is removed again"
    assert [p.path for p in n.repairs.damage] == ["weights.bin"]
    assert n.repairs.repairs == [digest]


def test_cached_only_never_fetches(n: Node) -> None:
    with pytest.raises(NotCached):
        n.publish(n.target(), fetch="CachedOnly")
    assert n.fetches.started == []


def test_a_missing_model_starts_one_fetch_and_the_retry_mounts_it(n: Node) -> None:
    target = n.target()
    with pytest.raises(FetchInProgress, match="being fetched"):
        n.publish(target)
    with pytest.raises(FetchInProgress):
        n.publish(target)
    assert n.fetches.refs_started() == [REF]
    row = n.fetches.finish(REF)
    assert row is not None
    n.catalog.model_path(row.digest).mkdir(parents=True)
    n.publish(target)
    assert n.mount_pins() == {(row.digest, str(target))}


def test_a_corrupt_model_is_refused_with_the_repair_failure_in_public_words(n: Node) -> None:
    digest = n.hold(REF, state=ModelState.CORRUPT)
    row = n.catalog.model(digest)
    assert row is not None
    n.catalog.add(replace(row, error="weights.bin: content differs in 1 chunk(s)"))
    n.repairs.failures[digest] = RepairFailed(
        "GET https://registry.example/v2/x answered 500: <html>stack trace</html>", reason="server"
    )
    with pytest.raises(ModelCorrupt) as raised:
        n.publish(n.target())
    assert "content differs" in str(raised.value) and "repair failed" in str(raised.value)
    assert "stack trace" not in str(raised.value)
    assert n.repairs.repairs == [digest]
    with pytest.raises(ModelCorrupt):
        n.publish(n.target("p2"), fetch="CachedOnly")
    assert n.repairs.repairs == [digest], "CachedOnly never starts a repair"


def test_unpublish_unmounts_unpins_and_removes_the_target(n: Node) -> None:
    digest = n.hold(REF)
    target = n.target()
    n.publish(target)
    n.unpublish(target)
    n.unpublish(target)  # idempotent
    assert n.mounter.table == {} and n.mount_pins() == set() and not target.exists()
    assert digest in n.catalog.models


def test_unpublish_leaves_a_mount_that_is_not_a_model_tree_alone(n: Node) -> None:
    target = n.target()
    target.mkdir()
    n.mounter.table[str(target)] = MountEntry(str(target), "/etc", frozenset({"rw"}), "0:999")
    with pytest.raises(FailedPrecondition):
        n.unpublish(target)
    assert str(target) in n.mounter.table
