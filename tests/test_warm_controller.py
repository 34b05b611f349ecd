"""The warm controller against a fake API server speaking the real list/watch protocol to the
official client: eligibility, annotation changes, rollouts, deletions, node label changes,
dropped watches and 410 recovery, and the node labels and Events it writes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import make_config

from weightcache.app.wiring import build_fetcher, build_policy
from weightcache.daemon.config import Config, WarmConfig
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.kube.client import KubeClient
from weightcache.daemon.kube.naming import WARM_ANNOTATION, label_key
from weightcache.daemon.kube.warm import WarmController
from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.store import Store
from weightcache.testing.fake_kube import FakeKube, deployment, node, run_fake_kube, statefulset
from weightcache.testing.faultproxy import FaultProxy, Rule
from weightcache.testing.models import ModelPublisher, sample_model, write_files

NODE = "gpu-1"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
TOLERATE = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
WAIT = 30.0
FAST = WarmConfig(watch_timeout_s=30, reconnect_delays=(0.05,), resync_s=0.5, retry_failed_s=3600)


@dataclass
class Running:
    kube: FakeKube
    controller: WarmController
    store: Store
    fetcher: Fetcher

    def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait for a settled pass where ``predicate`` holds (the controller is level-based, so
        every pass re-derives the whole state)."""
        self.controller.wake()
        assert self.controller.wait_until(predicate, WAIT), (
            f"timed out waiting for {what}; last error: {self.controller.last_error!r}"
        )

    def warm_pins(self) -> set[tuple[str, str]]:
        return {(m, h) for m, k, h in self.store.pins() if k == "warm"}

    def node_labels(self) -> dict[str, str]:
        obj = self.kube.get("Node", "", NODE) or {}
        labels: dict[str, str] = obj["metadata"].get("labels", {})
        return {k: v for k, v in labels.items() if k.startswith("warm.weightcache.io/")}

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.kube.objects("Event") if reason is None or e["reason"] == reason]

    def digest(self, ref: str) -> str | None:
        """The digest ``ref`` resolved to, once a fetch has resolved it."""
        return self.store.resolve_cached(str(parse_reference(ref)))


@contextlib.contextmanager
def running(tmp_path: Path, config: Config | None = None, **node_kwargs: Any) -> Iterator[Running]:
    config = config or make_config(tmp_path / "store")
    with run_fake_kube() as kube:
        kube.put(node(NODE, **node_kwargs))
        store = Store(config.store)
        fetcher = build_fetcher(config, store)
        client = KubeClient(str(kube.kubeconfig(tmp_path)), request_timeout_s=10)
        controller = WarmController(
            NODE,
            client,
            store,
            fetcher,
            FAST,
            build_policy(config, fetcher.sources, fetcher.signatures),
        )
        controller.start()
        try:
            yield Running(kube, controller, store, fetcher)
        finally:
            controller.stop()
            kube.drop_watches()
            client.close()
            fetcher.close()
            store.close()


def model(tmp_path: Path, name: str, seed: int) -> tuple[str, dict[str, bytes]]:
    files = sample_model(seed, shard_bytes=64 * 1024, shards=2)
    return f"file://{write_files(tmp_path / 'models' / name, files)}", files


def test_an_eligible_workload_is_warmed_labelled_and_told(tmp_path: Path) -> None:
    ref, files = model(tmp_path, "llama", 1)
    with running(tmp_path, labels={"gpu": "h100"}, taints=[GPU_TAINT]) as r:
        dep = r.kube.put(
            deployment(
                "llama",
                "team-a",
                annotations={WARM_ANNOTATION: ref},
                node_selector={"gpu": "h100"},
                tolerations=TOLERATE,
            )
        )
        key = label_key(parse_reference(ref))
        r.until(lambda: r.node_labels() == {key: "true"}, "the node label")
        digest = r.digest(ref)
        assert digest is not None
        assert r.warm_pins() == {(digest, "Deployment/team-a/llama")}
        assert r.store.model(digest).size == sum(map(len, files.values()))  # type: ignore[union-attr]
        r.until(lambda: len(r.events("WarmReady")) == 1, "WarmReady")
        (started,) = r.events("WarmStarted")
        (ready,) = r.events("WarmReady")
        for event in (started, ready):
            assert event["metadata"]["namespace"] == "team-a"
            assert event["type"] == "Normal"
            assert event["source"] == {"component": "weightcache-node", "host": NODE}
            involved = event["involvedObject"]
            assert (involved["kind"], involved["name"], involved["uid"]) == (
                "Deployment",
                "llama",
                dep["metadata"]["uid"],
            )
        size = sum(map(len, files.values()))
        assert f"{size} bytes" in ready["message"] and key in ready["message"]
        # Label patches were merge-style: only our key, the kubelet's labels untouched.
        labels = r.kube.get("Node", "", NODE)["metadata"]["labels"]  # type: ignore[index]
        assert labels["kubernetes.io/hostname"] == NODE and labels["gpu"] == "h100"


@pytest.mark.parametrize(
    ("spec", "eligible"),
    [
        ({"node_selector": {"gpu": "a100"}, "tolerations": TOLERATE}, False),
        ({}, False),  # the GPU taint is not tolerated
        (
            {
                "tolerations": TOLERATE,
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchExpressions": [
                                        {"key": "gpu", "operator": "In", "values": ["h100"]}
                                    ]
                                }
                            ]
                        }
                    }
                },
            },
            True,
        ),
        (
            {
                "tolerations": TOLERATE,
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {
                                    "matchFields": [
                                        {
                                            "key": "metadata.name",
                                            "operator": "NotIn",
                                            "values": [NODE],
                                        }
                                    ]
                                }
                            ]
                        }
                    }
                },
            },
            False,
        ),
    ],
)
def test_statefulsets_and_selectors(tmp_path: Path, spec: dict[str, Any], eligible: bool) -> None:
    ref, _ = model(tmp_path, "m", 2)
    marker, _ = model(tmp_path, "marker", 3)
    with running(tmp_path, labels={"gpu": "h100"}, taints=[GPU_TAINT]) as r:
        r.kube.put(statefulset("s", "ns", annotations={WARM_ANNOTATION: ref}, **spec))
        if eligible:
            r.until(lambda: {h for _, h in r.warm_pins()} == {"StatefulSet/ns/s"}, "s pinned")
            return
        # An always-eligible StatefulSet put second, on the same watch stream: once it is warm,
        # the first was seen and decided (a fetch would have been announced in that pass).
        r.kube.put(statefulset("marker", "ns", {WARM_ANNOTATION: marker}, tolerations=TOLERATE))
        r.until(lambda: label_key(parse_reference(marker)) in r.node_labels(), "the marker")
        assert {h for _, h in r.warm_pins()} == {"StatefulSet/ns/marker"}
        assert [e for e in r.events() if e["involvedObject"]["name"] == "s"] == []
        assert r.store.resolve_cached(str(parse_reference(ref))) is None


def test_annotation_changes_rollout_removal_and_deletion(tmp_path: Path) -> None:
    v1, _ = model(tmp_path, "v1", 4)
    v2, _ = model(tmp_path, "v2", 5)
    with running(tmp_path) as r:
        r.kube.put(deployment("app", "ns", {WARM_ANNOTATION: v1}))
        r.until(lambda: len(r.warm_pins()) == 1, "v1 pinned")
        d1 = r.digest(v1)
        assert d1 is not None
        # A pod on this node mounts v1 while the annotation moves to v2.
        r.store.pin(d1, "mount", "/var/lib/kubelet/pods/p1/volumes/model")
        r.kube.put(deployment("app", "ns", {WARM_ANNOTATION: v2}))
        r.until(lambda: r.warm_pins() == {(r.digest(v2), "Deployment/ns/app")}, "v2")
        assert r.store.gc(0) == []  # v1 is still mounted: nothing may evict it
        assert r.store.model(d1) is not None
        r.store.unpin(d1, "mount", "/var/lib/kubelet/pods/p1/volumes/model")
        # Two workloads want v2; removing the annotation from one keeps the other's pin.
        r.kube.put(deployment("other", "ns", {WARM_ANNOTATION: f"{v2}, {v1}"}))
        r.until(lambda: len(r.warm_pins()) == 3, "other pinned")
        r.kube.put(deployment("app", "ns", {}))
        r.until(lambda: {h for _, h in r.warm_pins()} == {"Deployment/ns/other"}, "app unpinned")
        r.kube.delete("Deployment", "ns", "other")
        r.until(lambda: r.warm_pins() == set(), "other unpinned")
        # Unpinned data stays until space is needed; then the label leaves with the model.
        assert len(r.node_labels()) == 2
        assert len(r.store.gc(0)) == 2
        r.until(lambda: r.node_labels() == {}, "labels removed after eviction")


def test_rollout_keeps_the_old_version_pinned_until_the_new_one_is_ready(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher
) -> None:
    from helpers import Hold

    v1, _ = model(tmp_path, "v1", 6)
    publisher.oras("rollout/app", "v2", sample_model(7))
    v2 = f"oci://{proxy.host}/rollout/app:v2"
    hold = Hold()
    proxy.state.rules.append(Rule("/blobs/", before=hold))
    try:
        with running(tmp_path) as r:
            r.kube.put(deployment("app", "ns", {WARM_ANNOTATION: v1}))
            r.until(lambda: len(r.warm_pins()) == 1, "v1 pinned")
            d1 = r.digest(v1)
            assert d1 is not None
            r.kube.put(deployment("app", "ns", {WARM_ANNOTATION: v2}))
            assert hold.arrived.wait(WAIT), "v2's fetch never started"
            passes = r.controller.passes
            r.until(lambda: r.controller.passes > passes + 1, "passes while v2 downloads")
            assert r.warm_pins() == {(d1, "Deployment/ns/app")}  # v1 kept meanwhile
            hold.release.set()
            r.until(lambda: r.warm_pins() == {(r.digest(v2), "Deployment/ns/app")}, "v2")
    finally:
        hold.release.set()


def test_a_node_label_change_makes_the_node_eligible_then_not(tmp_path: Path) -> None:
    ref, _ = model(tmp_path, "m", 8)
    with running(tmp_path) as r:
        r.kube.put(deployment("d", "ns", {WARM_ANNOTATION: ref}, node_selector={"pool": "llm"}))
        r.until(lambda: r.controller.passes > 0, "a first pass")
        assert r.warm_pins() == set() and r.store.models() == []
        r.kube.put(node(NODE, labels={"pool": "llm"}))
        r.until(lambda: len(r.warm_pins()) == 1, "warm after the label")
        r.kube.put(node(NODE, labels={"pool": "batch"}))
        r.until(lambda: r.warm_pins() == set(), "unpinned after the label left")


def test_watches_recover_from_a_drop_and_from_410(tmp_path: Path) -> None:
    a, _ = model(tmp_path, "a", 9)
    b, _ = model(tmp_path, "b", 10)
    with running(tmp_path) as r:
        informer = r.controller.informers["Deployment"]
        r.kube.put(deployment("a", "ns", {WARM_ANNOTATION: a}))
        r.until(lambda: len(r.warm_pins()) == 1, "a")
        # A dropped stream: the next watch resumes from the last resourceVersion, no relist.
        assert r.kube.drop_watches() >= 3
        r.kube.put(deployment("b", "ns", {WARM_ANNOTATION: b}))
        r.until(lambda: len(r.warm_pins()) == 2, "b after the drop")
        assert informer.lists == 1
        # Bookmarks move the resourceVersion forward on a quiet stream.
        r.kube.put(node("unrelated"))
        assert r.kube.wait_until(lambda: r.kube.watchers("Deployment") == 1, WAIT)
        before = informer.resource_version
        r.kube.bookmark()
        r.until(lambda: informer.resource_version != before, "the bookmark")
        assert int(informer.resource_version) == r.kube.revision
        # Disconnected while "b" is deleted and history compacted: the resumed watch gets 410
        # Gone, and only a fresh list shows that "b" is gone.
        r.kube.fail_next("/apis/apps/v1/deployments", 500, times=10**6)
        r.kube.drop_watches()
        assert r.kube.wait_until(lambda: any(q.status == 500 for q in r.kube.requests), WAIT), (
            "the informer never retried"
        )
        r.kube.delete("Deployment", "ns", "b")
        r.kube.compact()
        r.kube.clear_failures()
        r.until(lambda: {h for _, h in r.warm_pins()} == {"Deployment/ns/a"}, "b unpinned")
        assert informer.lists == 2


def test_failures_and_capacity_are_reported_once(tmp_path: Path) -> None:
    big, _ = model(tmp_path, "big", 11)
    config = make_config(tmp_path / "store", store={"budget_bytes": 32 * 1024})
    with running(tmp_path, config) as r:
        r.kube.put(
            deployment(
                "d",
                "ns",
                {WARM_ANNOTATION: f"{big}, file:///nonexistent/model, http://not-a-ref"},
            )
        )
        r.until(lambda: len(r.events()) >= 4, "events")
        passes = r.controller.passes
        r.until(lambda: r.controller.passes > passes + 2, "more passes")
        reasons = sorted(e["reason"] for e in r.events())
        # A directory outside the file roots is refused by the policy before any fetch.
        assert reasons == ["WarmDenied", "WarmFailed", "WarmNoSpace", "WarmStarted"]
        messages = " | ".join(e["message"] for e in r.events() if e["type"] == "Warning")
        assert "http://not-a-ref" in messages and "/nonexistent/model" in messages
        assert "budget" in messages
        assert r.warm_pins() == set() and r.node_labels() == {}


def test_events_the_api_refuses_do_not_hold_back_pins_and_labels(tmp_path: Path) -> None:
    ref, _ = model(tmp_path, "m", 12)
    with running(tmp_path) as r:
        r.kube.fail_next("/api/v1/namespaces/ns/events", 403, times=10**6)
        r.kube.put(deployment("d", "ns", {WARM_ANNOTATION: ref}))
        r.until(lambda: r.node_labels() == {label_key(parse_reference(ref)): "true"}, "label")
        assert {h for _, h in r.warm_pins()} == {"Deployment/ns/d"}
        assert r.events() == []

        def refused() -> int:
            return sum(1 for q in r.kube.requests if q.path.endswith("/events") and q.status == 403)

        assert r.kube.wait_until(lambda: refused() == 2, WAIT)  # WarmStarted and WarmReady
        passes = r.controller.passes
        r.until(lambda: r.controller.passes > passes + 1, "more passes")
        assert refused() == 2  # each tried once, not again on every pass


def test_an_event_the_api_could_not_take_is_offered_again(tmp_path: Path) -> None:
    ref, _ = model(tmp_path, "m", 13)
    with running(tmp_path) as r:
        r.kube.fail_next("/api/v1/namespaces/ns/events", 500, times=1)
        r.kube.put(deployment("d", "ns", {WARM_ANNOTATION: ref}))
        r.until(lambda: {e["reason"] for e in r.events()} == {"WarmStarted", "WarmReady"}, "both")
        failed = [q for q in r.kube.requests if q.path.endswith("/events") and q.status == 500]
        assert len(failed) == 1 and len(r.events()) == 2  # the refused one came through later
