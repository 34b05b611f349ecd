"""The fake apiserver against the official client, on the calls daemon/kube/client.py makes: if
these pass, the agent's client (paged lists, watches with bookmarks and 410 handling, node
patches, events) talks to the fake as to a cluster, and a call it does not make is refused
loudly. Streams synchronise the tests: an event is read only after the change that causes it,
so nothing sleeps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from weightcache.testing.fake_kube import FakeKube, deployment, node, run_fake_kube, statefulset

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


def status_of(exc: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.value.body)
    assert body["kind"] == "Status" and body["code"] == exc.value.status
    return body


def test_list_workloads_across_namespaces(kube: FakeKube, apps: client.AppsV1Api) -> None:
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
    # List items carry no kind, as the apiserver writes them (the agent's client adds it).
    raw = apps.list_deployment_for_all_namespaces(_preload_content=False)
    assert "kind" not in json.loads(raw.data)["items"][0]


def test_list_pages_are_one_snapshot(kube: FakeKube, apps: client.AppsV1Api) -> None:
    for name in ("a", "b", "c"):
        kube.put(deployment(name))

    page = apps.list_deployment_for_all_namespaces(limit=1)
    assert [d.metadata.name for d in page.items] == ["a"]
    at = page.metadata.resource_version
    # Changes after the first page do not show in the rest of the list.
    kube.delete("Deployment", "default", "b")
    kube.put(deployment("bb"))
    rest = apps.list_deployment_for_all_namespaces(limit=5, _continue=page.metadata._continue)
    assert [d.metadata.name for d in rest.items] == ["b", "c"]
    assert rest.metadata.resource_version == at and not rest.metadata._continue
    assert [d.metadata.name for d in apps.list_deployment_for_all_namespaces().items] == [
        "a",
        "bb",
        "c",
    ]

    kube.compact()
    with pytest.raises(ApiException) as gone:
        apps.list_deployment_for_all_namespaces(limit=5, _continue=page.metadata._continue)
    assert gone.value.status == 410 and status_of(gone)["reason"] == "Expired"
    with pytest.raises(ApiException) as bad:
        apps.list_deployment_for_all_namespaces(limit=5, _continue="not-a-token")
    assert bad.value.status == 400


def test_watch_delivers_typed_changes_in_order(kube: FakeKube, apps: client.AppsV1Api) -> None:
    kube.put(deployment("old", "team-a"))
    rv = apps.list_deployment_for_all_namespaces().metadata.resource_version
    kube.put(deployment("llama", "team-a"))
    kube.put(deployment("llama", "team-a", annotations={WARM: "oci://r.example/llama:v1"}))
    kube.put(node("n1"))  # another kind: not on this stream
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
    assert events[1]["object"].metadata.generation == 1  # metadata only
    assert events[3]["object"].spec.replicas == 3
    assert events[3]["object"].metadata.generation == 2
    assert events[0]["raw_object"]["kind"] == "Deployment"
    assert w.resource_version == str(kube.revision)


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
    quiet = watch.Watch().stream(
        apps.list_stateful_set_for_all_namespaces, resource_version=rv, timeout_seconds=30
    )
    kube.put(statefulset("db"))
    assert take(quiet, 1)[0]["type"] == "ADDED"  # this one is open now

    assert kube.bookmark() == 1  # only the watch that allowed bookmarks
    event = take(stream, 1)[0]
    stream.close()
    quiet.close()

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

    # The ERROR event ends the stream; with timeout_seconds the client raises it at once.
    with pytest.raises(ApiException) as gone:
        next(
            watch.Watch().stream(
                apps.list_deployment_for_all_namespaces, resource_version=rv, timeout_seconds=5
            )
        )
    assert gone.value.status == 410
    assert gone.value.reason == f"Expired: too old resource version: {rv} ({compacted})"
    (opened,) = [r for r in kube.requests if r.query.get("watch") == "true"]
    assert (opened.query["resourceVersion"], opened.status) == (rv, 200)
    assert kube.watchers() == 0


def test_watch_needs_a_resource_version(kube: FakeKube, apps: client.AppsV1Api) -> None:
    for rv in ("", "0", "x"):
        with pytest.raises(ApiException) as bad:
            next(
                watch.Watch().stream(
                    apps.list_deployment_for_all_namespaces, resource_version=rv, timeout_seconds=5
                )
            )
        assert bad.value.status == 400
    assert kube.watchers() == 0


def test_drop_watches_cuts_the_stream(kube: FakeKube, apps: client.AppsV1Api) -> None:
    rv = str(kube.revision)
    kube.put(deployment("llama"))
    stream = watch.Watch().stream(
        apps.list_deployment_for_all_namespaces, resource_version=rv, timeout_seconds=30
    )
    take(stream, 1)
    assert kube.watchers("Deployment") == 1

    assert kube.drop_watches() == 1
    # No terminating chunk: urllib3 reports the truncated chunked body; Watch does not retry.
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(stream)
    assert kube.watchers() == 0


def test_a_client_that_stops_watching_is_noticed(kube: FakeKube, apps: client.AppsV1Api) -> None:
    rv = str(kube.revision)
    kube.put(deployment("llama"))
    w = watch.Watch()
    stream = w.stream(apps.list_deployment_for_all_namespaces, resource_version=rv)
    take(stream, 1)
    w.stop()
    stream.close()
    assert kube.wait_until(lambda: kube.watchers() == 0)


def test_patch_node_labels_and_the_node_watch(kube: FakeKube, core: client.CoreV1Api) -> None:
    kube.put(node("n1", taints=[{"key": "gpu", "value": "true", "effect": "NoSchedule"}]))
    kube.put(node("n2"))
    rv = core.read_node("n1").metadata.resource_version

    # A dict body goes as a strategic merge patch: anything else would be refused (415).
    patched = core.patch_node("n1", {"metadata": {"labels": {READY: "true"}}})
    assert patched.metadata.labels[READY] == "true"
    core.patch_node("n2", {"metadata": {"labels": {READY: "true"}}})
    unchanged = core.patch_node("n1", {"metadata": {"labels": {READY: "true"}}})
    assert unchanged.metadata.resource_version == patched.metadata.resource_version
    removed = core.patch_node("n1", {"metadata": {"labels": {READY: None}}})
    assert READY not in removed.metadata.labels
    assert removed.metadata.labels["kubernetes.io/hostname"] == "n1"
    assert removed.spec.taints[0].key == "gpu"

    w = watch.Watch()
    stream = w.stream(
        core.list_node,
        field_selector="metadata.name=n1",
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=30,
    )
    events = take(stream, 2)
    stream.close()
    assert [e["type"] for e in events] == ["MODIFIED"] * 2
    assert all(isinstance(e["object"], client.V1Node) for e in events)
    assert [e["object"].metadata.name for e in events] == ["n1", "n1"]  # never n2
    assert [READY in (e["object"].metadata.labels or {}) for e in events] == [True, False]
    stored = kube.get("Node", None, "n1")
    assert stored is not None and stored["metadata"]["resourceVersion"] == w.resource_version


def test_node_calls_refuse_what_the_agent_never_sends(
    kube: FakeKube, core: client.CoreV1Api
) -> None:
    kube.put(node("n1"))
    before = kube.get("Node", "", "n1")
    with pytest.raises(ApiException) as json_patch:
        core.patch_node("n1", [{"op": "add", "path": "/metadata/labels/x", "value": "y"}])
    assert json_patch.value.status == 415
    with pytest.raises(ApiException) as merge_patch:
        core.patch_node(
            "n1", {"metadata": {"labels": {"x": "y"}}}, _content_type="application/merge-patch+json"
        )
    assert merge_patch.value.status == 415
    with pytest.raises(ApiException) as renamed:
        core.patch_node("n1", {"metadata": {"name": "n2"}})
    assert renamed.value.status == 422
    with pytest.raises(ApiException) as absent:
        core.patch_node("absent", {"metadata": {"labels": {"x": "y"}}})
    assert status_of(absent)["message"] == 'nodes "absent" not found'
    with pytest.raises(ApiException) as no_node:
        core.read_node("absent")
    assert no_node.value.status == 404
    assert status_of(no_node)["details"] == {"name": "absent", "kind": "nodes"}
    for selector in ("spec.unschedulable=false", "metadata.name!=n1"):
        with pytest.raises(ApiException) as bad:
            core.list_node(field_selector=selector)
        assert bad.value.status == 400
    with pytest.raises(ApiException) as labels:
        core.list_node(label_selector="gpu=h100")
    assert labels.value.status == 400
    assert kube.get("Node", "", "n1") == before


def test_events_are_created(kube: FakeKube, core: client.CoreV1Api) -> None:
    workload = kube.put(deployment("llama", "team-a"))
    body = client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="llama.0123456789abcdef", namespace="team-a"),
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

    assert created.metadata.namespace == "team-a" and created.metadata.uid
    (stored,) = kube.objects("Event")
    assert stored["metadata"]["name"] == "llama.0123456789abcdef"
    assert stored["reason"] == "WarmReady" and stored["count"] == 1
    assert stored["involvedObject"]["uid"] == workload["metadata"]["uid"]
    assert stored["source"] == {"component": "weightcache-node", "host": "n1"}
    assert stored["metadata"]["resourceVersion"] == str(kube.revision)

    with pytest.raises(ApiException) as exists:
        core.create_namespaced_event("team-a", body)
    assert exists.value.status == 409 and status_of(exists)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as elsewhere:
        core.create_namespaced_event("team-b", body)
    assert elsewhere.value.status == 400
    body.metadata = client.V1ObjectMeta(generate_name="llama.", namespace="team-a")
    with pytest.raises(ApiException) as unnamed:
        core.create_namespaced_event("team-a", body)
    assert unnamed.value.status == 422
    assert len(kube.objects("Event")) == 1


def test_fail_next_answers_with_the_status(kube: FakeKube, apps: client.AppsV1Api) -> None:
    kube.fail_next("/apis/apps/v1/deployments", 500, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as failed:
            apps.list_deployment_for_all_namespaces()
        assert failed.value.status == 500 and status_of(failed)["reason"] == "InternalError"
    assert apps.list_deployment_for_all_namespaces().items == []

    kube.fail_next("/apis/apps/v1/", 403, times=10**6)
    with pytest.raises(ApiException) as forbidden:
        next(
            watch.Watch().stream(
                apps.list_stateful_set_for_all_namespaces, resource_version="1", timeout_seconds=5
            )
        )
    assert forbidden.value.status == 403
    kube.clear_failures()
    assert apps.list_stateful_set_for_all_namespaces().items == []
    assert [(r.path, r.status) for r in kube.requests] == [
        ("/apis/apps/v1/deployments", 500),
        ("/apis/apps/v1/deployments", 500),
        ("/apis/apps/v1/deployments", 200),
        ("/apis/apps/v1/statefulsets", 403),
        ("/apis/apps/v1/statefulsets", 200),
    ]


def test_unknown_paths_verbs_parameters_and_tokens(
    kube: FakeKube, apps: client.AppsV1Api, core: client.CoreV1Api
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
    # Served by a real apiserver, but not by this fake: the agent never asks.
    with pytest.raises(ApiException) as namespaced:
        apps.list_namespaced_deployment("team-a")
    assert namespaced.value.status == 404
    with pytest.raises(ApiException) as events:
        core.list_namespaced_event("team-a")
    assert events.value.status == 405
    kube.put(node("n1"))
    with pytest.raises(ApiException) as replaced:
        core.replace_node("n1", client.V1Node(metadata=client.V1ObjectMeta(name="n1")))
    assert replaced.value.status == 405 and status_of(replaced)["reason"] == "MethodNotAllowed"
    with pytest.raises(ApiException) as deleted:
        core.delete_node("n1")
    assert deleted.value.status == 405
    with pytest.raises(ApiException) as selected:
        apps.list_deployment_for_all_namespaces(label_selector="app=x")
    assert selected.value.status == 400
    with pytest.raises(ApiException) as exact:
        apps.list_deployment_for_all_namespaces(resource_version="1")
    assert exact.value.status == 400
    assert kube.get("Node", "", "n1") is not None

    assert http.request("GET", f"{kube.url}/api/v1/nodes/n1").status == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert http.request("GET", f"{kube.url}/api/v1/nodes/n1", headers=wrong).status == 401
    assert http.request("GET", f"{kube.url}/api/v1/nodes/n1", headers=auth).status == 200


def test_exit_ends_open_watches(tmp_path: Path) -> None:
    with run_fake_kube() as kube:
        api_client = config.new_client_from_config(config_file=str(kube.kubeconfig(tmp_path)))
        rv = str(kube.revision)
        kube.put(deployment("llama"))
        stream = watch.Watch().stream(
            client.AppsV1Api(api_client).list_deployment_for_all_namespaces, resource_version=rv
        )
        take(stream, 1)
    with pytest.raises(urllib3.exceptions.ProtocolError):
        next(stream)
    api_client.close()
