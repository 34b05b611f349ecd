"""The fake apiserver against the official client: if these pass, code written for a real
cluster (typed lists, Watch.stream with bookmarks and 410 handling, patches, events) runs
against the fake unchanged. Streams synchronise the tests: an event is read only after the
change that causes it, so nothing sleeps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from weightcache.testing.fake_kube import (
    JSON_PATCH,
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    FakeKube,
    deployment,
    node,
    run_fake_kube,
    statefulset,
)

WARM = "weightcache.io/warm"
READY = "warm.weightcache.io/0123456789abcdef0123456789abcdef01234567"

Stream = Iterator[dict[str, Any]]


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with run_fake_kube() as fake:
        yield fake


@pytest.fixture
def api(kube: FakeKube, tmp_path: Path) -> Iterator[client.ApiClient]:
    api_client = config.new_client_from_config(config_file=str(kube.kubeconfig(tmp_path)))
    yield api_client
    api_client.close()


@pytest.fixture
def apps(api: client.ApiClient) -> client.AppsV1Api:
    return client.AppsV1Api(api)


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def take(stream: Stream, n: int) -> list[dict[str, Any]]:
    return [next(stream) for _ in range(n)]


def test_list_deployments_across_namespaces(kube: FakeKube, apps: client.AppsV1Api) -> None:
    kube.put(deployment("llama", "team-a", annotations={WARM: "oci://r.example/llama:v1"}))
    kube.put(deployment("mistral", "team-b"))
    kube.put(statefulset("db", "team-a"))

    listed = apps.list_deployment_for_all_namespaces()

    assert listed.metadata.resource_version == str(kube.revision)
    assert [(d.metadata.namespace, d.metadata.name) for d in listed.items] == [
        ("team-a", "llama"),
        ("team-b", "mistral"),
    ]
    llama = listed.items[0]
    assert isinstance(llama, client.V1Deployment)
    assert llama.metadata.annotations == {WARM: "oci://r.example/llama:v1"}
    assert llama.metadata.uid and llama.metadata.generation == 1
    assert llama.metadata.creation_timestamp is not None
    assert llama.spec.template.spec.containers[0].name == "app"
    assert [s.metadata.name for s in apps.list_stateful_set_for_all_namespaces().items] == ["db"]
    assert [d.metadata.name for d in apps.list_namespaced_deployment("team-b").items] == ["mistral"]
    assert apps.read_namespaced_deployment("llama", "team-a").metadata.uid == llama.metadata.uid
    selected = apps.list_deployment_for_all_namespaces(label_selector="app in (mistral,x)")
    assert [d.metadata.name for d in selected.items] == ["mistral"]


def test_list_pages_and_exact_snapshots(kube: FakeKube, apps: client.AppsV1Api) -> None:
    for name in ("a", "b", "c"):
        kube.put(deployment(name))
    before = str(kube.revision)
    kube.delete("Deployment", "default", "b")

    page = apps.list_deployment_for_all_namespaces(limit=1)
    assert [d.metadata.name for d in page.items] == ["a"]
    assert page.metadata.remaining_item_count == 1
    rest = apps.list_deployment_for_all_namespaces(limit=5, _continue=page.metadata._continue)
    assert [d.metadata.name for d in rest.items] == ["c"]

    old = apps.list_deployment_for_all_namespaces(
        resource_version=before, resource_version_match="Exact"
    )
    assert [d.metadata.name for d in old.items] == ["a", "b", "c"]
    kube.compact()
    with pytest.raises(ApiException) as gone:
        apps.list_deployment_for_all_namespaces(
            resource_version=before, resource_version_match="Exact"
        )
    assert gone.value.status == 410


def test_watch_delivers_typed_changes_in_order(kube: FakeKube, apps: client.AppsV1Api) -> None:
    kube.put(deployment("old", "team-a"))
    rv = apps.list_deployment_for_all_namespaces().metadata.resource_version
    kube.put(deployment("llama", "team-a"))
    kube.put(deployment("llama", "team-a", annotations={WARM: "oci://r.example/llama:v1"}))
    kube.delete("Deployment", "team-a", "old")

    w = watch.Watch()
    stream = w.stream(
        apps.list_deployment_for_all_namespaces,
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=30,
    )
    events = take(stream, 3)
    # A change after the stream opened arrives on the same stream.
    kube.put(deployment("llama", "team-a", replicas=3))
    events += take(stream, 1)
    stream.close()

    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "llama"),
        ("MODIFIED", "llama"),
        ("DELETED", "old"),
        ("MODIFIED", "llama"),
    ]
    assert all(isinstance(e["object"], client.V1Deployment) for e in events)
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(versions) and versions[-1] == kube.revision
    assert events[1]["object"].metadata.annotations == {WARM: "oci://r.example/llama:v1"}
    assert events[3]["object"].spec.replicas == 3
    assert events[3]["object"].metadata.generation == 2
    assert events[0]["raw_object"]["kind"] == "Deployment"
    assert w.resource_version == str(kube.revision)


def test_watch_without_resource_version_starts_with_current_state(
    kube: FakeKube, apps: client.AppsV1Api
) -> None:
    kube.put(deployment("b", "team-b"))
    kube.put(deployment("a", "team-a"))
    stream = watch.Watch().stream(apps.list_deployment_for_all_namespaces, timeout_seconds=30)
    first = take(stream, 2)
    stream.close()
    assert [(e["type"], e["object"].metadata.name) for e in first] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]


def test_label_selector_watch_sees_objects_enter_and_leave(
    kube: FakeKube, apps: client.AppsV1Api
) -> None:
    rv = str(kube.revision)
    kube.put(deployment("llama"))
    kube.put(deployment("llama", annotations={WARM: "x"}))
    labelled = deployment("llama")
    labelled["metadata"]["labels"]["tier"] = "gpu"
    kube.put(labelled)
    kube.put(deployment("llama"))

    stream = watch.Watch().stream(
        apps.list_deployment_for_all_namespaces,
        resource_version=rv,
        label_selector="tier=gpu",
        timeout_seconds=30,
    )
    assert [e["type"] for e in take(stream, 2)] == ["ADDED", "DELETED"]
    stream.close()


def test_bookmark_advances_the_watch_resource_version(
    kube: FakeKube, apps: client.AppsV1Api
) -> None:
    rv = str(kube.revision)
    kube.put(deployment("llama"))
    w = watch.Watch()
    stream = w.stream(
        apps.list_deployment_for_all_namespaces,
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=30,
    )
    assert take(stream, 1)[0]["type"] == "ADDED"
    kube.put(node("n1"))  # the revision moves on; the deployment watch sees nothing
    assert w.resource_version != str(kube.revision)

    assert kube.bookmark() == 1
    event = take(stream, 1)[0]
    stream.close()

    assert event["type"] == "BOOKMARK"
    assert event["raw_object"] == {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": {"resourceVersion": str(kube.revision)},
    }
    assert w.resource_version == str(kube.revision)


def test_watch_from_a_compacted_version_is_gone(kube: FakeKube, apps: client.AppsV1Api) -> None:
    rv = apps.list_deployment_for_all_namespaces().metadata.resource_version
    kube.put(deployment("llama"))
    compacted = kube.compact()

    # With timeout_seconds the client does not retry: the ERROR event becomes an ApiException.
    w = watch.Watch()
    list_all = apps.list_deployment_for_all_namespaces
    with pytest.raises(ApiException) as gone:
        next(w.stream(list_all, resource_version=rv, timeout_seconds=5))
    assert gone.value.status == 410
    assert gone.value.reason == f"Expired: too old resource version: {rv} ({compacted})"

    # Without it the client retries once from the same version, then raises the same.
    before = len(kube.requests)
    with pytest.raises(ApiException) as again:
        next(w.stream(list_all, resource_version=rv))
    assert again.value.status == 410
    watches = [r for r in kube.requests[before:] if r.query.get("watch") == "true"]
    assert [(r.query["resourceVersion"], r.status) for r in watches] == [(rv, 200), (rv, 200)]


def test_compact_can_expire_open_watches_that_are_behind(
    kube: FakeKube, apps: client.AppsV1Api
) -> None:
    stream = watch.Watch().stream(apps.list_deployment_for_all_namespaces, timeout_seconds=30)
    kube.put(deployment("llama"))
    assert take(stream, 1)[0]["type"] == "ADDED"
    kube.put(node("n1"))  # this watch has not seen the current revision
    kube.compact(expire_open=True)
    with pytest.raises(ApiException) as gone:
        next(stream)
    assert gone.value.status == 410
    assert kube.watchers("Deployment") == 0


def test_drop_watches_cuts_the_stream(kube: FakeKube, apps: client.AppsV1Api) -> None:
    kube.put(deployment("llama"))
    stream = watch.Watch().stream(apps.list_deployment_for_all_namespaces, timeout_seconds=30)
    take(stream, 1)
    assert kube.watchers("Deployment") == 1

    assert kube.drop_watches() == 1
    # No terminating chunk: urllib3 reports the truncated chunked body; Watch does not retry.
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(stream)
    assert kube.watchers() == 0


def test_a_client_that_stops_watching_is_noticed(kube: FakeKube, apps: client.AppsV1Api) -> None:
    kube.put(deployment("llama"))
    w = watch.Watch()
    stream = w.stream(apps.list_deployment_for_all_namespaces)
    take(stream, 1)
    w.stop()
    stream.close()
    assert kube.wait_until(lambda: kube.watchers() == 0)


def test_patch_node_labels_and_the_node_watch(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.put(node("n1", taints=[{"key": "gpu", "value": "true", "effect": "NoSchedule"}]))
    kube.put(node("n2"))
    rv = core.list_node(field_selector="metadata.name=n1").metadata.resource_version

    patched = core.patch_node("n1", {"metadata": {"labels": {READY: "true"}}})
    assert patched.metadata.labels[READY] == "true"
    assert kube.patches[-1].content_type == STRATEGIC_MERGE_PATCH
    core.patch_node("n2", {"metadata": {"labels": {READY: "true"}}})
    unchanged = core.patch_node("n1", {"metadata": {"labels": {READY: "true"}}})
    assert unchanged.metadata.resource_version == patched.metadata.resource_version
    removed = core.patch_node("n1", {"metadata": {"labels": {READY: None}}})
    assert READY not in removed.metadata.labels
    assert removed.metadata.labels["kubernetes.io/hostname"] == "n1"
    escaped = "/metadata/labels/" + READY.replace("/", "~1")
    core.patch_node("n1", [{"op": "add", "path": escaped, "value": "true"}])
    assert kube.patches[-1].content_type == JSON_PATCH
    core.patch_node(
        "n1",
        {"metadata": {"annotations": {"a": "b"}}},
        _content_type=MERGE_PATCH,
    )
    assert kube.patches[-1].content_type == MERGE_PATCH

    w = watch.Watch()
    stream = w.stream(
        core.list_node,
        field_selector="metadata.name=n1",
        resource_version=rv,
        timeout_seconds=30,
    )
    events = take(stream, 4)
    stream.close()
    assert [e["type"] for e in events] == ["MODIFIED"] * 4
    assert all(isinstance(e["object"], client.V1Node) for e in events)
    assert [READY in (e["object"].metadata.labels or {}) for e in events] == [
        True,
        False,
        True,
        True,
    ]
    assert events[3]["object"].metadata.annotations == {"a": "b"}
    assert events[0]["object"].spec.taints[0].key == "gpu"
    stored = kube.get("Node", None, "n1")
    assert stored is not None and stored["metadata"]["resourceVersion"] == w.resource_version
    with pytest.raises(ApiException) as bad:
        core.patch_node("n1", [{"op": "remove", "path": "/metadata/labels/absent"}])
    assert bad.value.status == 422


def test_events_are_created_patched_and_listed(kube: FakeKube, core: client.CoreV1Api) -> None:
    workload = kube.put(deployment("llama", "team-a"))
    body = client.CoreV1Event(
        metadata=client.V1ObjectMeta(generate_name="llama."),
        involved_object=client.V1ObjectReference(
            api_version="apps/v1",
            kind="Deployment",
            name="llama",
            namespace="team-a",
            uid=workload["metadata"]["uid"],
        ),
        reason="WarmReady",
        message="model ready on n1",
        type="Normal",
        count=1,
        source=client.V1EventSource(component="weightcache-node", host="n1"),
    )

    created = core.create_namespaced_event("team-a", body)

    name = created.metadata.name
    assert name.startswith("llama.") and len(name) == len("llama.") + 5
    stored = kube.get("Event", "team-a", name)
    assert stored is not None
    assert stored["reason"] == "WarmReady" and stored["count"] == 1
    assert stored["involvedObject"]["uid"] == workload["metadata"]["uid"]
    assert stored["source"] == {"component": "weightcache-node", "host": "n1"}
    assert stored["metadata"]["uid"] and stored["metadata"]["resourceVersion"]

    body.metadata = client.V1ObjectMeta(name=name)
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_event("team-a", body)
    assert exists.value.status == 409
    assert json.loads(exists.value.body)["reason"] == "AlreadyExists"

    bumped = core.patch_namespaced_event(name, "team-a", {"count": 2})
    assert bumped.count == 2
    listed = core.list_namespaced_event(
        "team-a", field_selector="involvedObject.name=llama,reason=WarmReady"
    )
    assert [(e.metadata.name, e.count) for e in listed.items] == [(name, 2)]


def test_fail_next_answers_with_the_status(kube: FakeKube, apps: client.AppsV1Api) -> None:
    kube.fail_next("/apis/apps/v1/deployments", 500)
    with pytest.raises(ApiException) as failed:
        apps.list_deployment_for_all_namespaces()
    assert failed.value.status == 500
    assert json.loads(failed.value.body)["reason"] == "InternalError"

    kube.fail_next("/apis/apps/v1/", 503, method="GET")
    with pytest.raises(ApiException) as unavailable:
        next(watch.Watch().stream(apps.list_deployment_for_all_namespaces, timeout_seconds=5))
    assert unavailable.value.status == 503
    assert [r.status for r in kube.requests] == [500, 503]

    # urllib3 (under the client) retries a 429 with Retry-After by itself, up to 3 times...
    kube.fail_next("/apis/apps/v1/", 429, times=3)
    assert apps.list_deployment_for_all_namespaces().items == []
    assert [r.status for r in kube.requests][2:] == [429, 429, 429, 200]
    # ...so the 4th in a row is the first the caller sees.
    kube.fail_next("/apis/apps/v1/", 429, times=4)
    with pytest.raises(ApiException) as throttled:
        apps.list_deployment_for_all_namespaces()
    assert throttled.value.status == 429
    assert throttled.value.headers["Retry-After"] == "0"
    assert apps.list_deployment_for_all_namespaces().items == []


def test_unknown_paths_verbs_and_tokens(
    kube: FakeKube, core: client.CoreV1Api, tmp_path: Path
) -> None:
    http = urllib3.PoolManager()
    auth = {"Authorization": f"Bearer {kube.token}"}

    missing = http.request("GET", f"{kube.url}/apis/nope/v1/things", headers=auth)
    assert missing.status == 404
    assert json.loads(missing.data) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "the server could not find the requested resource",
        "reason": "NotFound",
        "details": {},
        "code": 404,
    }
    with pytest.raises(ApiException) as no_node:
        core.read_node("absent")
    assert no_node.value.status == 404
    assert json.loads(no_node.value.body)["message"] == 'nodes "absent" not found'

    kube.put(node("n1"))
    with pytest.raises(ApiException) as not_allowed:
        core.replace_node("n1", client.V1Node(metadata=client.V1ObjectMeta(name="n1")))
    assert not_allowed.value.status == 405
    assert json.loads(not_allowed.value.body)["reason"] == "MethodNotAllowed"

    stranger = http.request("GET", f"{kube.url}/api/v1/nodes/n1")
    assert stranger.status == 401


def test_exit_ends_open_watches(tmp_path: Path) -> None:
    with run_fake_kube() as kube:
        api_client = config.new_client_from_config(config_file=str(kube.kubeconfig(tmp_path)))
        kube.put(deployment("llama"))
        stream = watch.Watch().stream(
            client.AppsV1Api(api_client).list_deployment_for_all_namespaces
        )
        take(stream, 1)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(stream)
    api_client.close()
