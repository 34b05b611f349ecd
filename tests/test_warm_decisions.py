"""The warm controller's decisions, fast: the real controller and policy over in-memory fakes of
the project's own seams (the Kubernetes calls, the catalog, the fetches). Each test sets up a
cluster and a store in memory, runs reconcile passes by hand and reads every decision: pins,
fetches started, node labels, Events. tests/test_warm_controller.py runs the same controller
against a fake API server speaking the real list/watch protocol to the official client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest

from weightcache.daemon.config import PolicyConfig, PolicyRule, WarmConfig
from weightcache.daemon.errors import InsufficientSpace, SourceError
from weightcache.daemon.kube.naming import LABEL_PREFIX, WARM_ANNOTATION, label_key
from weightcache.daemon.kube.warm import WarmController
from weightcache.daemon.policy import Policy
from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.states import PinKind
from weightcache.testing.fake_kube import deployment, node, statefulset
from weightcache.testing.memory import ManualFetches, MemoryCatalog, MemoryKube, model_row

NODE = "gpu-1"
LLAMA = "oci://registry.example/team-a/llama:v1"
LLAMA2 = "oci://registry.example/team-a/llama:v2"
MISTRAL = "oci://registry.example/team-a/mistral:v1"
PRIVATE = "oci://registry.example/team-b/secret:v1"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
TOLERATE = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@dataclass
class World:
    kube: MemoryKube
    catalog: MemoryCatalog
    fetches: ManualFetches
    controller: WarmController
    now: list[float] = field(default_factory=lambda: [1_000_000.0])

    def settle(self) -> None:
        """Show the controller the cluster as it is now, and run one pass."""
        for informer in self.controller.informers.values():
            informer.relist()
        self.controller.reconcile()

    def warm_pins(self) -> set[tuple[str, str]]:
        return {(m, h) for m, k, h in self.catalog.pins() if k == PinKind.WARM}

    def labels(self) -> dict[str, str]:
        return self.kube.labels(LABEL_PREFIX)

    def events(self, reason: str) -> list[str]:
        return [str(e["message"]) for e in self.kube.events if e["reason"] == reason]


def digest(ref: str) -> str:
    return model_row(ref).digest


def key(ref: str) -> str:
    return label_key(parse_reference(ref))


def world(
    config: WarmConfig | None = None,
    policy: PolicyConfig | None = None,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
) -> World:
    kube = MemoryKube(node(NODE, labels=labels, taints=taints))
    catalog = MemoryCatalog()
    fetches = ManualFetches(catalog)
    now = [1_000_000.0]
    controller = WarmController(
        NODE,
        kube,
        catalog,
        fetches,
        config or WarmConfig(),
        Policy(policy or PolicyConfig(), access=_NoRegistry(), public=lambda ref, manifest: True),
        clock=lambda: now[0],
    )
    return World(kube, catalog, fetches, controller, now)


class _NoRegistry:
    def check(self, ref: object, manifest: str, secrets: object) -> None:
        raise SourceError("no registry in these tests", reason="network")


@pytest.fixture
def w() -> Iterator[World]:
    yield world()


def warm(name: str, *refs: str, namespace: str = "team-a", **kwargs: object) -> dict[str, object]:
    return deployment(name, namespace, annotations={WARM_ANNOTATION: ",".join(refs)}, **kwargs)  # type: ignore[arg-type]


def test_a_cached_model_is_pinned_and_labelled_without_a_fetch(w: World) -> None:
    w.catalog.add(model_row(LLAMA))
    w.kube.put(warm("llama", LLAMA))
    w.settle()
    assert w.fetches.started == []
    assert w.warm_pins() == {(digest(LLAMA), "Deployment/team-a/llama")}
    assert w.labels() == {key(LLAMA): "true"}
    assert len(w.events("WarmReady")) == 1 and "already cached" in w.events("WarmReady")[0]


def test_two_workloads_share_one_fetch_and_each_is_told_once(w: World) -> None:
    w.kube.put(warm("a", LLAMA))
    w.kube.put(warm("b", LLAMA, namespace="team-c"))
    w.settle()
    w.settle()
    assert w.fetches.refs_started() == [LLAMA]
    assert len(w.events("WarmStarted")) == 2
    assert w.warm_pins() == set() and w.labels() == {}
    w.fetches.finish(LLAMA)
    w.settle()
    w.settle()
    assert w.warm_pins() == {
        (digest(LLAMA), "Deployment/team-a/a"),
        (digest(LLAMA), "Deployment/team-c/b"),
    }
    assert w.labels() == {key(LLAMA): "true"}
    assert len(w.events("WarmReady")) == 2 and len(w.events("WarmStarted")) == 2


@pytest.mark.parametrize(
    "spec",
    [
        {"node_selector": {"gpu": "a100"}},
        {},  # the node's NoSchedule taint is not tolerated
        {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "gpu", "operator": "NotIn", "values": ["h100"]}]}]}}}},
    ],
    ids=["node-selector", "taint", "affinity"],
)  # fmt: skip
def test_a_workload_that_cannot_land_here_warms_nothing(spec: dict[str, object]) -> None:
    w = world(labels={"gpu": "h100"}, taints=[GPU_TAINT])
    w.kube.put(warm("llama", LLAMA, **({"tolerations": TOLERATE} if spec else {}), **spec))
    w.settle()
    assert w.fetches.started == [] and w.warm_pins() == set() and w.kube.events == []
    w.kube.put(warm("llama", LLAMA, node_selector={"gpu": "h100"}, tolerations=TOLERATE))
    w.settle()
    assert w.fetches.refs_started() == [LLAMA]  # the same workload, now able to land here


def test_a_statefulset_is_warmed_like_a_deployment(w: World) -> None:
    w.catalog.add(model_row(LLAMA))
    w.kube.put(statefulset("db", "team-a", annotations={WARM_ANNOTATION: LLAMA}))
    w.settle()
    assert w.warm_pins() == {(digest(LLAMA), "StatefulSet/team-a/db")}


def test_scaling_to_zero_or_deleting_drops_the_pins_but_not_the_label(w: World) -> None:
    w.catalog.add(model_row(LLAMA))
    w.kube.put(warm("a", LLAMA))
    w.kube.put(warm("b", LLAMA))
    w.settle()
    assert len(w.warm_pins()) == 2
    w.kube.put(warm("a", LLAMA, replicas=0))
    w.kube.delete("Deployment", "team-a", "b")
    w.settle()
    assert w.warm_pins() == set()
    assert w.labels() == {key(LLAMA): "true"}  # still ready here: pods may still land on it


def test_too_many_references_warm_nothing_and_say_why() -> None:
    w = world(WarmConfig(refs_per_workload=2))
    w.kube.put(warm("greedy", LLAMA, LLAMA2, MISTRAL))
    w.settle()
    assert w.fetches.started == []
    (denied,) = w.events("WarmDenied")
    assert "3 references" in denied and "refs_per_workload" in denied


def test_the_namespace_quota_refuses_at_admission_and_leaves_other_tenants_alone() -> None:
    w = world(WarmConfig(namespace_bytes=1500))
    w.kube.put(warm("one", LLAMA))
    w.kube.put(warm("two", MISTRAL))
    w.kube.put(warm("other", MISTRAL, namespace="team-c"))
    w.settle()
    assert sorted(w.fetches.refs_started()) == [LLAMA, MISTRAL]
    w.fetches.finish(LLAMA, size=1000)
    w.settle()
    # team-a holds 1000 of its 1500 bytes; team-c asks for the same model and has room, so
    # the fetch is admitted for team-c alone and team-a's workload is refused at the pin.
    w.fetches.finish(MISTRAL, size=1000)
    w.settle()
    assert w.warm_pins() == {
        (digest(LLAMA), "Deployment/team-a/one"),
        (digest(MISTRAL), "Deployment/team-c/other"),
    }
    assert any("namespace_bytes" in m and "team-a" in m for m in w.events("WarmDenied"))


def test_an_admitted_fetch_counts_against_the_quota_until_its_model_is_pinned() -> None:
    w = world(WarmConfig(namespace_bytes=1500))
    w.kube.put(warm("one", LLAMA))
    w.kube.put(warm("two", MISTRAL))
    w.settle()
    w.fetches.resolve(LLAMA, size=1000)  # admitted: 1000 of 1500 reserved
    w.fetches.resolve(MISTRAL, size=1000)  # refused: 1000 + 1000 > 1500
    w.fetches.finish(LLAMA, size=1000)
    assert w.fetches.finish(MISTRAL) is None
    w.settle()
    assert w.warm_pins() == {(digest(LLAMA), "Deployment/team-a/one")}
    assert any("namespace_bytes" in m for m in w.events("WarmDenied"))


def test_the_node_label_quota_stops_new_fetches() -> None:
    w = world(WarmConfig(labels_per_node=2))
    w.kube.put(warm("a", LLAMA, LLAMA2, MISTRAL))
    w.settle()
    assert len(w.fetches.started) == 2
    assert any("labels_per_node" in m for m in w.events("WarmDenied"))


def test_a_rollout_keeps_the_old_model_pinned_until_the_new_one_is_ready(w: World) -> None:
    w.catalog.add(model_row(LLAMA))
    w.kube.put(warm("llama", LLAMA))
    w.settle()
    w.kube.put(warm("llama", LLAMA2))
    w.settle()
    assert w.fetches.refs_started() == [LLAMA2]
    assert w.warm_pins() == {(digest(LLAMA), "Deployment/team-a/llama")}
    w.fetches.finish(LLAMA2)
    w.settle()
    assert w.warm_pins() == {(digest(LLAMA2), "Deployment/team-a/llama")}
    assert w.labels() == {key(LLAMA2): "true", key(LLAMA): "true"}  # both still ready here


def test_an_evicted_model_loses_its_label_and_is_fetched_again(w: World) -> None:
    w.catalog.add(model_row(LLAMA))
    w.kube.put(warm("llama", LLAMA))
    w.settle()
    w.catalog.evict(digest(LLAMA))
    w.settle()
    assert w.labels() == {}
    assert w.fetches.refs_started() == [LLAMA]


def test_an_idle_warm_pin_is_released_until_a_pod_mounts_the_model() -> None:
    w = world(WarmConfig(idle_pin_s=3600))
    w.catalog.add(model_row(LLAMA))
    w.kube.put(warm("llama", LLAMA))
    w.settle()
    assert w.warm_pins()
    row = w.catalog.model(digest(LLAMA))
    assert row is not None
    w.catalog.add(replace(row, last_used=w.now[0] - 7200))  # nobody used it for two hours
    w.settle()
    assert w.warm_pins() == set()
    w.settle()
    assert w.warm_pins() == set(), "a released pin is not taken again by the next pass"
    w.catalog.pin(digest(LLAMA), PinKind.MOUNT, "/var/lib/kubelet/pods/p/volumes/v")
    w.settle()
    assert w.warm_pins() == {(digest(LLAMA), "Deployment/team-a/llama")}


def test_the_tenant_policy_refuses_before_anything_is_fetched() -> None:
    rule = PolicyRule(models=("oci://registry.example/team-b/*",), namespaces=("team-b",))
    w = world(policy=PolicyConfig(rules=(rule,)))
    w.kube.put(warm("thief", PRIVATE, namespace="team-a"))
    w.kube.put(warm("owner", PRIVATE, namespace="team-b"))
    w.settle()
    assert w.fetches.refs_started() == [PRIVATE]
    w.fetches.finish(PRIVATE)
    w.settle()
    assert w.warm_pins() == {(digest(PRIVATE), "Deployment/team-b/owner")}
    (denied,) = w.events("WarmDenied")
    assert "team-a" in denied and "/var/lib" not in denied


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (SourceError("registry.example answered 500", reason="server"), "WarmFailed"),
        (InsufficientSpace("needs 1000 bytes, 10 free"), "WarmNoSpace"),
    ],
)
def test_a_failed_fetch_is_told_once_and_retried_after_the_wait(
    error: Exception, reason: str
) -> None:
    w = world(WarmConfig(retry_failed_s=0))
    w.kube.put(warm("llama", LLAMA))
    w.settle()
    w.fetches.fail(LLAMA, error)
    w.settle()
    assert len(w.events(reason)) == 1
    assert w.fetches.refs_started() == [LLAMA, LLAMA]  # retry_failed_s = 0: the next pass
    w.fetches.finish(LLAMA)
    w.settle()
    w.settle()
    assert len(w.events(reason)) == 1
    assert w.warm_pins() == {(digest(LLAMA), "Deployment/team-a/llama")}


def test_a_failed_fetch_waits_before_it_is_tried_again() -> None:
    w = world(WarmConfig(retry_failed_s=3600))
    w.kube.put(warm("llama", LLAMA))
    w.settle()
    w.fetches.fail(LLAMA, SourceError("500", reason="server"))
    for _ in range(3):
        w.settle()
    assert w.fetches.refs_started() == [LLAMA]
    assert len(w.events("WarmFailed")) == 1
