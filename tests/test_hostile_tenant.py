"""A hostile tenant against one shared node: the real CSI socket, real bind mounts, the real
registry (behind the auth-demanding fault proxy) and a fake API server speaking the real
list/watch protocol to the warm controller. Each attack is a named case; the run ends with a
tally: attacks tried, denied, bytes of another tenant's content the attacker could read (must be
0), and whether any other tenant's publish or fetch failed during the warm storm.

The victim, team-a, holds a private model (it needed the node's credentials) and a policy rule
granting it to team-a only. The attacker is team-b.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from csi_harness import NodeHarness, mountinfo_entries, publish, serving_node, unpublish
from helpers import dockerconfig, make_config, read_tree, report

from weightcache.app.wiring import build_policy
from weightcache.daemon.config import Config, PolicyConfig, PolicyRule, RegistryConfig, WarmConfig
from weightcache.daemon.errors import WeightcacheError
from weightcache.daemon.kube.client import KubeClient
from weightcache.daemon.kube.naming import WARM_ANNOTATION
from weightcache.daemon.kube.warm import WarmController
from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.states import Access
from weightcache.testing.fake_kube import FakeKube, deployment, node, run_fake_kube
from weightcache.testing.faultproxy import FaultProxy, Rule
from weightcache.testing.models import ModelPublisher, sample_model
from weightcache.testing.oci_push import OCI_MANIFEST, sha256_digest

NS = "csi.storage.k8s.io/pod.namespace"
Code = grpc.StatusCode
SECTION = "hostile tenant"


@dataclass
class Tally:
    tried: int = 0
    denied: int = 0
    leaked: int = 0
    lines: list[str] = field(default_factory=list)

    def attack(self, name: str, denied: bool, leaked: int) -> None:
        self.tried += 1
        self.denied += denied
        self.leaked += leaked
        self.lines.append(
            f"  {name}: {'denied' if denied else 'NOT DENIED'}, {leaked} bytes leaked"
        )


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    t = Tally()
    yield t
    report(
        request.config,
        SECTION,
        f"attacks tried {t.tried}, denied {t.denied}, bytes leaked {t.leaked}",
    )
    for line in t.lines:
        report(request.config, SECTION, line)


@dataclass
class Victim:
    ref: str
    files: dict[str, bytes]
    digest: str


@dataclass
class Node:
    config: Config
    harness: NodeHarness
    victim: Victim
    proxy: FaultProxy
    kubelet: Path

    async def publish(
        self, ref: str, name: str, namespace: str = "team-b", secrets: dict[str, str] | None = None
    ) -> tuple[Code, str]:
        """Publish as a pod of ``namespace`` would; (OK or the error code, details)."""
        request = publish(ref, self.kubelet / name, secrets, **{NS: namespace})
        try:
            await self.harness.stub.NodePublishVolume(request)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return Code.OK, ""

    async def join_fetch(self, ref: str) -> None:
        """Wait for the node's one fetch of ``ref`` (starting it if none runs)."""
        await asyncio.wrap_future(self.harness.fetcher.warm_async(parse_reference(ref)))

    def leaked(self, name: str) -> int:
        """Bytes of the victim's files readable at an attacker's target."""
        target = self.kubelet / name
        if not target.is_dir():
            return 0
        victim = set(self.victim.files.values())
        return sum(len(data) for data in read_tree(target).values() if data in victim)


def _config(tmp_path: Path, proxy: FaultProxy, **warm: Any) -> Config:
    node_creds = tmp_path / "node-creds" / "config.json"
    node_creds.parent.mkdir(parents=True, exist_ok=True)
    node_creds.write_text(dockerconfig(proxy.host, "puller", "s3cret")[".dockerconfigjson"])
    port = proxy.host.rsplit(":", 1)[1]
    return make_config(
        tmp_path / "store",
        registry=RegistryConfig(
            docker_config=node_creds, aliases={f"localhost:{port}": proxy.host}
        ),
        policy=PolicyConfig(
            default="allow",
            file_roots=(tmp_path / "shared",),
            rules=(
                PolicyRule(models=(f"oci://{proxy.host}/team-a/*",), namespaces=("team-a",)),
                PolicyRule(models=(f"oci://{proxy.host}/team-b/*",), namespaces=("team-b",)),
            ),
        ),
        warm=WarmConfig(
            watch_timeout_s=30, reconnect_delays=(0.05,), resync_s=0.5, retry_failed_s=3600, **warm
        ),
    )


@contextlib.asynccontextmanager
async def shared_node(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, **warm: Any
) -> Any:
    """A node that has fetched team-a's private model for a team-a pod; ``warm`` settings."""
    files = sample_model(501)
    publisher.oras("team-a/llm", "v1", files)
    proxy.state.auth = "basic"
    config = _config(tmp_path, proxy, **warm)
    (tmp_path / "shared").mkdir()
    ref = f"oci://{proxy.host}/team-a/llm:v1"
    async with serving_node(tmp_path, config) as h:
        node = Node(config, h, Victim(ref, files, ""), proxy, config.csi.kubelet_dir)
        code, details = await node.publish(ref, "victim", "team-a")
        assert code == Code.OK, details
        row = h.store.cached_model(ref)
        assert row is not None and row.access == Access.CREDENTIALS
        node.victim.digest = row.digest
        yield node


def _run(coro: Callable[[], Any]) -> Any:
    return asyncio.run(coro())


# -- file:// --------------------------------------------------------------------------------


def test_file_urls_cannot_reach_node_directories(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, tally: Tally
) -> None:
    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            store = n.config.store.root
            os.symlink(store / "models", tmp_path / "shared" / "innocent")
            attempts = {
                "file_store_models": f"file://{store}/models",
                "file_store_root": f"file://{store}",
                "file_model_tree": f"file://{store}/models/{n.victim.digest.split(':')[1]}",
                "file_symlink_into_store": f"file://{tmp_path}/shared/innocent",
                "file_kubelet_dir": f"file://{n.kubelet}",
                "file_node_config": f"file://{tmp_path}/node-creds",
                "file_outside_roots": "file:///etc",
                "file_missing_outside_roots": "file:///no/such/dir",
            }
            messages = {}
            for name, ref in attempts.items():
                code, details = await n.publish(ref, name)
                leaked = n.leaked(name)
                tally.attack(name, code == Code.PERMISSION_DENIED, leaked)
                assert code == Code.PERMISSION_DENIED, (name, details)
                assert leaked == 0 and mountinfo_entries(n.kubelet / name) == 0
                messages[name] = details.replace(ref, "REF")
            # The refusal reads the same whether the directory exists or not: no oracle.
            assert messages["file_outside_roots"] == messages["file_missing_outside_roots"]
            assert len(n.harness.store.models()) == 1  # nothing was fetched for the attacker

    _run(main)


# -- private models -----------------------------------------------------------------------------


def test_a_private_model_is_refused_to_other_namespaces_however_it_is_spelled(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, tally: Tally
) -> None:
    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            port = proxy.host.rsplit(":", 1)[1]
            digest = n.victim.digest
            spellings = {
                "private_as_typed": n.victim.ref,
                "private_by_digest": f"oci://{proxy.host}/team-a/llm@{digest}",
                "private_by_alias": f"oci://localhost:{port}/team-a/llm:v1",
                "private_alias_upper_case": f"oci://LOCALHOST:{port}/team-a/llm:v1",
            }
            for name, ref in spellings.items():
                code, details = await n.publish(ref, name)
                leaked = n.leaked(name)
                tally.attack(name, code == Code.PERMISSION_DENIED, leaked)
                assert code == Code.PERMISSION_DENIED, (name, details)
                assert leaked == 0
                # The tenant is not told which namespaces the rule grants.
                assert "team-a'" not in details and "team-a*" not in details
            # The same spellings from team-a are one model: no second fetch.
            code, _ = await n.publish(f"oci://localhost:{port}/team-a/llm:v1", "alias", "team-a")
            assert code == Code.OK and len(n.harness.store.models()) == 1

    _run(main)


def test_a_credentialed_model_without_a_rule_needs_the_pods_own_pull_secret(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, tally: Tally
) -> None:
    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            publisher.oras("shared/base", "v1", sample_model(502))
            ref = f"oci://{proxy.host}/shared/base:v1"
            # The node can fetch it (its own credentials), but no rule grants it to anybody.
            code, details = await n.publish(ref, "no_secret")
            leaked = n.leaked("no_secret")
            tally.attack("credentialed_without_pull_secret", code == Code.PERMISSION_DENIED, leaked)
            assert code == Code.PERMISSION_DENIED and "needs credentials" in details
            assert n.harness.store.cached_model(ref) is None  # refused before any fetch
            wrong = dockerconfig(proxy.host, "puller", "not-the-password")
            code, details = await n.publish(ref, "wrong_secret", secrets=wrong)
            tally.attack(
                "credentialed_wrong_pull_secret",
                code == Code.PERMISSION_DENIED,
                n.leaked("wrong_secret"),
            )
            assert code == Code.PERMISSION_DENIED
            right = dockerconfig(proxy.host, "puller", "s3cret")
            code, details = await n.publish(ref, "right_secret", secrets=right)
            assert code == Code.OK, details  # the pod's own secret opens it
            # Once fetched, it stays private: another pod without the secret is refused.
            code, _ = await n.publish(ref, "after", "team-c")
            tally.attack("credentialed_after_fetch", code == Code.PERMISSION_DENIED, 0)
            assert code == Code.PERMISSION_DENIED

    _run(main)


def test_an_anonymous_model_is_public_on_the_node(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, registry: Any
) -> None:
    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            publisher.oras("public/tiny", "v1", sample_model(503))
            ref = f"oci://{registry.host}/public/tiny:v1"  # straight to the registry: no auth
            code, details = await n.publish(ref, "public", "anyone")
            assert code == Code.OK, details
            row = n.harness.store.cached_model(ref)
            assert row is not None and row.access == Access.ANONYMOUS

    _run(main)


# -- blobs another tenant brought ----------------------------------------------------------------


def _rogue_manifest(victim_files: dict[str, bytes], size_delta: int = 0) -> bytes:
    name, data = max(victim_files.items(), key=lambda kv: len(kv[1]))
    config = b"{}"
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.unknown.artifact.v1",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": sha256_digest(config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha256_digest(data),
                "size": len(data) + size_delta,
                "annotations": {"org.opencontainers.image.title": name},
            }
        ],
    }
    return json.dumps(doc).encode()


@pytest.mark.parametrize("claim", ["blob", "blob_wrong_size", "whole_manifest"])
def test_a_rogue_manifest_cannot_claim_what_another_tenant_brought(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, tally: Tally, claim: str
) -> None:
    """team-b's registry serves, under team-b's name, a manifest naming one of team-a's blobs
    (at its size or not), or team-a's very manifest, without holding the blobs."""

    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            if claim == "whole_manifest":
                body = publisher.pusher.get_manifest("team-a/llm", "v1")[0]
            else:
                body = _rogue_manifest(n.victim.files, int(claim == "blob_wrong_size"))
            proxy.state.rules.append(
                Rule(
                    path=r"/v2/team-b/rogue/manifests/v1$",
                    status=200,
                    body=body,
                    headers={
                        "Content-Type": OCI_MANIFEST,
                        "Docker-Content-Digest": sha256_digest(body),
                    },
                )
            )
            with proxy.state.lock:
                proxy.state.requests.clear()  # only what the attack costs
            ref = f"oci://{proxy.host}/team-b/rogue:v1"
            code, _ = await n.publish(ref, "rogue0")
            if code == Code.UNAVAILABLE:  # still fetching: the kubelet would retry
                with contextlib.suppress(WeightcacheError):
                    await n.join_fetch(ref)
                code, _ = await n.publish(ref, "rogue1")
            leaked = n.leaked("rogue0") + n.leaked("rogue1")
            tally.attack(f"rogue_manifest_claims_{claim}", code != Code.OK, leaked)
            assert code != Code.OK and leaked == 0
            row = n.harness.store.cached_model(ref)
            assert row is None or row.digest != n.victim.digest  # never team-a's model
            assert row is None or row.state != "ready"
            heads = [p for m, p, _ in proxy.state.requests if m == "HEAD" and "/blobs/" in p]
            if claim == "blob_wrong_size":
                assert heads == []  # the declared size already disagrees: no proof asked
            else:
                assert heads and all(p.startswith("/v2/team-b/rogue/blobs/") for p in heads), heads
            blob_gets = [
                (p, st) for m, p, st in proxy.state.requests if m == "GET" and "/blobs/" in p
            ]
            assert all(st >= 400 for _, st in blob_gets)  # team-b's repository had nothing

    _run(main)


def test_a_repository_that_does_hold_the_blob_reuses_it_without_a_download(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher
) -> None:
    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            publisher.oras("team-b/copy", "v1", n.victim.files)  # team-b pushed the same files
            with proxy.state.lock:
                proxy.state.requests.clear()
                proxy.state.blob_bytes_relayed = 0
            ref = f"oci://{proxy.host}/team-b/copy:v1"
            await n.join_fetch(ref)
            code, details = await n.publish(ref, "copy")
            assert code == Code.OK, details
            assert read_tree(n.kubelet / "copy") == n.victim.files
            # Proven by HEAD in team-b's own repository; the bytes were already on the node.
            assert proxy.state.blob_bytes_relayed <= len(b"{}")
            heads = {p for m, p, _ in proxy.state.requests if m == "HEAD" and "/blobs/" in p}
            assert heads and all(p.startswith("/v2/team-b/copy/blobs/") for p in heads)

    _run(main)


# -- CSI targets -----------------------------------------------------------------------------


def test_targets_outside_the_kubelet_dir_or_through_symlinks_are_refused(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, tally: Tally, registry: Any
) -> None:
    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            publisher.oras("public/t", "v1", sample_model(504))
            ref = f"oci://{registry.host}/public/t:v1"
            elsewhere = tmp_path / "elsewhere"
            elsewhere.mkdir()
            (n.kubelet / "pods").mkdir(parents=True)
            os.symlink(elsewhere, n.kubelet / "pods" / "link")
            stub = n.harness.stub
            targets = {
                "target_outside_kubelet_dir": tmp_path / "outside" / "mount",
                "target_dotdot_escape": Path(f"{n.kubelet}/pods/../../outside2/mount"),
                "target_through_symlink": n.kubelet / "pods" / "link" / "mount",
            }
            for name, target in targets.items():
                request = publish(ref, target, **{NS: "team-b"})
                request.target_path = str(target)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.NodePublishVolume(request)
                denied = exc.value.code() == Code.INVALID_ARGUMENT
                tally.attack(name, denied, 0)
                assert denied, (name, exc.value.details())
            assert not (tmp_path / "outside").exists() and not (tmp_path / "outside2").exists()
            assert list(elsewhere.iterdir()) == []  # nothing created through the link
            # A mount at a target that is not one of this store's trees is left alone.
            foreign = n.kubelet / "pods" / "foreign" / "mount"
            foreign.mkdir(parents=True)
            n.harness.mounter.bind_read_only(elsewhere, foreign)  # not a model tree
            try:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.NodeUnpublishVolume(unpublish(foreign))
                left_alone = exc.value.code() == Code.FAILED_PRECONDITION
                tally.attack("unpublish_foreign_mount", left_alone, 0)
                assert left_alone and mountinfo_entries(foreign) == 1
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.NodeUnpublishVolume(unpublish(Path("/proc")))
                assert exc.value.code() == Code.INVALID_ARGUMENT
                tally.attack("unpublish_outside_kubelet_dir", True, 0)
            finally:
                n.harness.mounter.unmount(foreign)

    _run(main)


# -- what a tenant reads ----------------------------------------------------------------------

SECRET_BODY = b"internal-metadata-token-d41d8cd98f00b204"


def test_errors_a_tenant_reads_carry_no_remote_body(
    tmp_path: Path,
    proxy: FaultProxy,
    publisher: ModelPublisher,
    tally: Tally,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            proxy.state.rules.append(
                Rule(path=r"/v2/team-b/probe/manifests/", status=403, body=SECRET_BODY)
            )
            code, details = await n.publish(f"oci://{proxy.host}/team-b/probe:v1", "probe")
            if code == Code.UNAVAILABLE:
                with contextlib.suppress(WeightcacheError):
                    await n.join_fetch(f"oci://{proxy.host}/team-b/probe:v1")
                code, details = await n.publish(f"oci://{proxy.host}/team-b/probe:v1", "probe2")
            clean = code != Code.OK and SECRET_BODY.decode() not in details
            tally.attack("read_back_remote_body_via_csi_error", clean, 0)
            assert clean, details
            assert "403" in details or "auth" in details  # still says what failed

    with caplog.at_level("INFO"):
        _run(main)
    assert SECRET_BODY.decode() in caplog.text  # the operator's log keeps the detail


# -- the warm controller --------------------------------------------------------------------------


@contextlib.contextmanager
def warm_controller(
    n: Node, tmp_path: Path, clock: Callable[[], float] | None = None
) -> Iterator[tuple[FakeKube, WarmController]]:
    with run_fake_kube() as kube:
        kube.put(node("gpu-1"))
        client = KubeClient(str(kube.kubeconfig(tmp_path)), request_timeout_s=10)
        h = n.harness
        controller = WarmController(
            "gpu-1",
            client,
            h.store,
            h.fetcher,
            n.config.warm,
            build_policy(n.config, h.fetcher.sources, h.fetcher.signatures),
            aliases=n.config.registry.aliases,
            **({"clock": clock} if clock else {}),
        )
        controller.start()
        try:
            yield kube, controller
        finally:
            controller.stop()
            kube.drop_watches()
            client.close()


def _events(kube: FakeKube, namespace: str, reason: str) -> list[dict[str, Any]]:
    return [
        e
        for e in kube.objects("Event")
        if e["reason"] == reason and e["metadata"]["namespace"] == namespace
    ]


def test_warm_requests_from_another_namespace_are_denied_before_any_fetch(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, tally: Tally
) -> None:
    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            other = sample_model(505)
            publisher.oras("team-a/next", "v1", other)
            with proxy.state.lock:
                proxy.state.requests.clear()
            with warm_controller(n, tmp_path) as (kube, controller):
                kube.put(
                    deployment(
                        "steal",
                        "team-b",
                        annotations={WARM_ANNOTATION: f"oci://{proxy.host}/team-a/next:v1"},
                    )
                )
                kube.put(
                    deployment(
                        "idle",
                        "team-b",
                        annotations={WARM_ANNOTATION: f"oci://{proxy.host}/team-b/x:v1"},
                        replicas=0,
                    )
                )
                assert kube.wait_until(lambda: _events(kube, "team-b", "WarmDenied"), 30)
                passes = controller.passes
                controller.wake()
                assert controller.wait_until(lambda: controller.passes > passes + 1, 30)
                (event,) = _events(kube, "team-b", "WarmDenied")
                assert "may not mount" in event["message"]
            fetched = [
                p for m, p, s in proxy.state.requests if "/team-a/next/" in p or "/team-b/x/" in p
            ]
            denied = (
                fetched == []
                and n.harness.store.cached_model(f"oci://{proxy.host}/team-a/next:v1") is None
            )
            tally.attack("warm_other_namespaces_private_model", denied, 0)
            tally.attack("warm_with_zero_replicas", "/team-b/x/" not in str(fetched), 0)
            assert denied, fetched
            assert {h for _, k, h in n.harness.store.pins() if k == "warm"} == set()

    _run(main)


def test_a_warm_storm_from_one_namespace_stays_within_its_quota(
    tmp_path: Path,
    proxy: FaultProxy,
    publisher: ModelPublisher,
    registry: Any,
    request: pytest.FixtureRequest,
    tally: Tally,
) -> None:
    size = sum(map(len, sample_model(600).values()))
    quota = int(size * 2.5)

    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher, namespace_bytes=quota) as n:
            refs = []
            for i in range(6):
                publisher.oras(f"storm/m{i}", "v1", sample_model(600 + i))
                refs.append(f"oci://{registry.host}/storm/m{i}:v1")
            publisher.oras("team-c/own", "v1", sample_model(700))
            publisher.oras("team-c/mounted", "v1", sample_model(701))
            own = f"oci://{registry.host}/team-c/own:v1"
            with warm_controller(n, tmp_path) as (kube, controller):
                for i, ref in enumerate(refs):
                    kube.put(deployment(f"s{i}", "storm", annotations={WARM_ANNOTATION: ref}))
                many = ",".join(f"oci://{registry.host}/storm/extra{i}:v1" for i in range(9))
                kube.put(deployment("many", "storm", annotations={WARM_ANNOTATION: many}))
                kube.put(deployment("c", "team-c", annotations={WARM_ANNOTATION: own}))
                # Another tenant's pod mounts its model while the storm goes on.
                code, details = await n.publish(
                    f"oci://{registry.host}/team-c/mounted:v1", "team-c-pod", "team-c"
                )
                if code == Code.UNAVAILABLE:
                    await n.join_fetch(f"oci://{registry.host}/team-c/mounted:v1")
                    code, details = await n.publish(
                        f"oci://{registry.host}/team-c/mounted:v1", "team-c-pod2", "team-c"
                    )
                other_publish_ok = code == Code.OK
                assert other_publish_ok, details

                def settled() -> bool:
                    denied = {
                        e["involvedObject"]["name"] for e in _events(kube, "storm", "WarmDenied")
                    }
                    ready = _events(kube, "team-c", "WarmReady")
                    return bool(ready) and "many" in denied and len(denied) >= 1 + 6 - 2

                assert controller.wait_until(settled, 60), [
                    (e["reason"], e["message"]) for e in kube.objects("Event")
                ]
                store = n.harness.store
                storm_digests = {
                    m for m, k, h in store.pins() if k == "warm" and h.split("/")[1] == "storm"
                }
                storm_bytes = sum(store.model(d).size for d in storm_digests)  # type: ignore[union-attr]
                fetched = [
                    r for r in refs if (row := store.cached_model(r)) and row.state == "ready"
                ]
                extra = [p for m, p, s in proxy.state.requests if "/storm/extra" in p]
                own_row = store.cached_model(own)
                other_warm_ok = own_row is not None and own_row.state == "ready"
                denials = len(_events(kube, "storm", "WarmDenied"))
            assert storm_bytes <= quota and len(fetched) <= 2
            assert extra == []  # the workload over refs_per_workload fetched nothing
            assert other_warm_ok
            assert ("warm", "Deployment/team-c/c") in {(k, h) for _, k, h in store.pins()}
            message = next(
                e["message"]
                for e in _events(kube, "storm", "WarmDenied")
                if e["involvedObject"]["name"] == "many"
            )
            assert "refs_per_workload" in message
            tally.attack("warm_storm_over_namespace_bytes", storm_bytes <= quota, 0)
            tally.attack("warm_refs_per_workload", extra == [], 0)
            report(
                request.config,
                SECTION,
                f"warm storm: 7 workloads in namespace storm, {len(fetched)} models warmed "
                f"({storm_bytes} bytes pinned, quota {quota}), {denials} WarmDenied; other "
                f"tenant's warm {'ok' if other_warm_ok else 'FAILED'}, publish "
                f"{'ok' if other_publish_ok else 'FAILED'}",
            )

    _run(main)


def test_an_idle_warm_pin_is_released_and_not_taken_again(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, registry: Any
) -> None:
    now = [1_000_000_000.0]

    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher, idle_pin_s=3600) as n:
            publisher.oras("team-b/idle", "v1", sample_model(800))
            ref = f"oci://{registry.host}/team-b/idle:v1"
            with warm_controller(n, tmp_path, clock=lambda: now[0]) as (kube, controller):
                now[0] = time.time()
                kube.put(deployment("d", "team-b", annotations={WARM_ANNOTATION: ref}))

                def pinned() -> bool:
                    return ("warm", "Deployment/team-b/d") in {
                        (k, h) for _, k, h in n.harness.store.pins()
                    }

                assert controller.wait_until(pinned, 30)
                now[0] += 3601  # no pod mounted it for longer than idle_pin_s
                controller.wake()
                assert controller.wait_until(lambda: not pinned(), 30)
                n.harness.store.gc(0)  # unpinned now: evictable
                assert n.harness.store.cached_model(ref) is None
                with proxy.state.lock:
                    proxy.state.requests.clear()
                passes = controller.passes
                controller.wake()
                assert controller.wait_until(lambda: controller.passes > passes + 2, 30)
                assert n.harness.store.cached_model(ref) is None and not pinned()

    _run(main)


def test_warm_events_carry_no_remote_body(
    tmp_path: Path, proxy: FaultProxy, publisher: ModelPublisher, tally: Tally
) -> None:
    async def main() -> None:
        async with shared_node(tmp_path, proxy, publisher) as n:
            proxy.state.rules.append(
                Rule(path=r"/v2/team-b/probe/manifests/", status=403, body=SECRET_BODY)
            )
            ref = f"oci://{proxy.host}/team-b/probe:v1"
            with warm_controller(n, tmp_path) as (kube, _):
                kube.put(deployment("p", "team-b", annotations={WARM_ANNOTATION: ref}))
                assert kube.wait_until(lambda: _events(kube, "team-b", "WarmFailed"), 30)
                (event,) = _events(kube, "team-b", "WarmFailed")
            clean = SECRET_BODY.decode() not in event["message"]
            tally.attack("read_back_remote_body_via_warm_event", clean, 0)
            assert clean and "auth" in event["message"], event["message"]

    _run(main)
