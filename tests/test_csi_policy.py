"""Tenant policy at publish: namespaces per model pattern, and the pod's own pull secret checked
against the real registry (behind an auth-demanding proxy) before cached bytes are mounted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

import grpc
import pytest
from csi_harness import mountinfo_entries, publish, serving_node
from helpers import dockerconfig, make_config

from weightcache.daemon.config import PolicyConfig, PolicyRule, RegistryConfig
from weightcache.daemon.errors import PolicyDenied, SourceError
from weightcache.daemon.policy import Policy
from weightcache.daemon.references import OciRef, parse_reference
from weightcache.daemon.store.index import ModelRow
from weightcache.testing.faultproxy import FaultProxy
from weightcache.testing.models import ModelPublisher, sample_model, write_files

NS = "csi.storage.k8s.io/pod.namespace"
Code = grpc.StatusCode


# -- namespaces ------------------------------------------------------------------------------


def test_namespaces_allowed_denied_and_unknown(tmp_path: Path) -> None:
    team = write_files(tmp_path / "models" / "team-a" / "m", sample_model(3))
    other = write_files(tmp_path / "models" / "other" / "m", sample_model(4))
    policy = PolicyConfig(
        default="deny",
        rules=(
            PolicyRule(models=(f"file://{tmp_path}/models/team-a/*",), namespaces=("team-a*",)),
        ),
    )
    config = make_config(tmp_path / "store", policy=policy)

    async def main() -> None:
        async with serving_node(tmp_path, config) as n:

            async def denied(request: object) -> str:
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await n.stub.NodePublishVolume(request)
                assert exc.value.code() == Code.PERMISSION_DENIED, exc.value.details()
                return exc.value.details() or ""

            ref = f"file://{team}"
            msg = await denied(publish(ref, tmp_path / "kubelet" / "t1", **{NS: "team-b"}))
            # The tenant is not told which namespaces the rule grants (the log says).
            assert "'team-b' may not mount" in msg and "team-a*" not in msg
            msg = await denied(publish(ref, tmp_path / "kubelet" / "t2"))
            assert "podInfoOnMount" in msg
            msg = await denied(
                publish(f"file://{other}", tmp_path / "kubelet" / "t3", **{NS: "team-a"})
            )
            assert "no policy rule allows" in msg
            # A refused pod never causes a download, and leaves no directory behind.
            assert n.store.models() == []
            assert not any((tmp_path / t).exists() for t in ("t1", "t2", "t3"))
            await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            for ns in ("team-a", "team-a-dev"):
                target = tmp_path / "kubelet" / f"ok-{ns}"
                await n.stub.NodePublishVolume(publish(ref, target, **{NS: ns}))
                assert mountinfo_entries(target) == 1

    asyncio.run(main())


def test_default_allow_needs_no_pod_info(tmp_path: Path) -> None:
    ref = f"file://{write_files(tmp_path / 'm', sample_model(5))}"

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            await n.stub.NodePublishVolume(publish(ref, tmp_path / "kubelet" / "t"))
            assert mountinfo_entries(tmp_path / "kubelet" / "t") == 1

    asyncio.run(main())


# -- pull secrets against the registry -------------------------------------------------------


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_pull_secret_checked_against_the_registry(
    proxy: FaultProxy,
    publisher: ModelPublisher,
    tmp_path: Path,
    scheme: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = sample_model(9)
    publisher.oras(f"private/{scheme}", "v1", files)
    proxy.state.auth = scheme
    ref = f"oci://{proxy.host}/private/{scheme}:v1"
    node_creds = tmp_path / "node-config.json"
    node_creds.write_text(dockerconfig(proxy.host, "puller", "s3cret")[".dockerconfigjson"])
    policy = PolicyConfig(
        rules=(
            PolicyRule(
                models=(f"oci://{proxy.host}/private/*",),
                namespaces=("team-a",),
                require_pull_secret=True,
            ),
        )
    )
    config = make_config(
        tmp_path / "store", registry=RegistryConfig(docker_config=node_creds), policy=policy
    )
    wrong_password = "wr0ng-pa55"
    manifest_heads = lambda: sum(  # noqa: E731
        1 for m, p, s in proxy.state.requests if m == "HEAD" and "/manifests/" in p and s == 200
    )
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with serving_node(tmp_path, config) as n:

            async def denied(secrets: Mapping[str, str], target: str) -> str:
                request = publish(
                    ref, tmp_path / "kubelet" / target, dict(secrets), **{NS: "team-a"}
                )
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await n.stub.NodePublishVolume(request)
                assert exc.value.code() == Code.PERMISSION_DENIED, exc.value.details()
                return exc.value.details() or ""

            assert "nodePublishSecretRef" in await denied({}, "none")
            msg = await denied(dockerconfig(proxy.host, "puller", wrong_password), "wrong")
            assert "refused by" in msg and "HTTP 401" in msg
            msg = await denied(dockerconfig("elsewhere.example", "puller", "s3cret"), "host")
            assert f"no credentials for {proxy.host}" in msg
            msg = await denied({"token": "x"}, "keys")
            assert "neither .dockerconfigjson nor username and password" in msg
            assert n.store.models() == []  # nothing fetched for a refused pod

            good = dockerconfig(proxy.host, "puller", "s3cret")
            request = publish(ref, tmp_path / "kubelet" / "ok", good, **{NS: "team-a"})
            await n.stub.NodePublishVolume(request)  # checked, then fetched and mounted
            assert mountinfo_entries(tmp_path / "kubelet" / "ok") == 1
            assert manifest_heads() == 1
            basic = publish(
                ref, tmp_path / "kubelet" / "ok2", {"username": "puller", "password": "s3cret"}
            )
            basic.volume_context[NS] = "team-a"
            await n.stub.NodePublishVolume(basic)
            # Once cached, the check names the manifest digest (the tag could move).
            await n.stub.NodePublishVolume(
                publish(ref, tmp_path / "kubelet" / "ok3", good, **{NS: "team-a"})
            )
            checks = manifest_heads()
            assert checks == 3
            await n.stub.NodePublishVolume(
                publish(ref, tmp_path / "kubelet" / "ok4", good, **{NS: "team-a"})
            )
            assert manifest_heads() == checks  # the repeat was answered from memory
            assert all(
                mountinfo_entries(tmp_path / "kubelet" / f"ok{i}") == 1 for i in ("", 2, 3, 4)
            )
            # Another namespace is refused before credentials are even looked at.
            request = publish(ref, tmp_path / "kubelet" / "b", good, **{NS: "team-b"})
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await n.stub.NodePublishVolume(request)
            assert exc.value.code() == Code.PERMISSION_DENIED

    asyncio.run(main())
    assert wrong_password not in caplog.text and "s3cret" not in caplog.text
    assert base64.b64encode(b"puller:s3cret").decode() not in caplog.text
    assert "***stripped***" in caplog.text  # the secrets field was logged, redacted


# -- the decision memory, with a fake registry and clock --------------------------------------


class CountingAccess:
    def __init__(self, allow: bool, fail: bool = False) -> None:
        self.allow, self.fail, self.calls = allow, fail, 0

    def check(self, ref: OciRef, manifest: str, secrets: Mapping[str, str]) -> None:
        self.calls += 1
        if self.fail:
            raise SourceError("registry unreachable", reason="network", retryable=True)
        if not self.allow:
            raise PolicyDenied(f"refused for {manifest}")


def PRIVATE(ref: object, manifest: str) -> bool:
    return False


CACHED = ModelRow(
    *("sha256:" + "1" * 64, "oci://r.example/team/m:v1", "oci", "ready"),
    *(1, 1, 0.0, 0.0, 0.0, 1, 1, 0.0, "", "credentials", "digest", "", "", 0.0),
)


def test_decisions_are_remembered_briefly() -> None:
    now = [100.0]
    ref = parse_reference("oci://r.example/team/m:v1")
    secrets = {"username": "u", "password": "p"}
    for allow in (True, False):
        access = CountingAccess(allow)
        policy = Policy(PolicyConfig(credential_cache_s=30), access, PRIVATE, clock=lambda: now[0])
        for _ in range(3):
            if allow:
                policy.authorize(ref, "ns", secrets, CACHED)
            else:
                with pytest.raises(PolicyDenied, match="refused"):
                    policy.authorize(ref, "ns", secrets, CACHED)
        assert access.calls == 1
        now[0] += 31
        with pytest.raises(PolicyDenied) if not allow else contextlib.nullcontext():
            policy.authorize(ref, "ns", secrets, CACHED)
        assert access.calls == 2
        # Other credentials or another manifest are separate decisions.
        with pytest.raises(PolicyDenied) if not allow else contextlib.nullcontext():
            policy.authorize(ref, "ns", {**secrets, "password": "q"}, CACHED)
        assert access.calls == 3


def test_an_unreachable_registry_is_not_remembered() -> None:
    access = CountingAccess(allow=True, fail=True)
    policy = Policy(PolicyConfig(), access, PRIVATE)
    ref = parse_reference("oci://r.example/team/m:v1")
    for _ in range(2):
        with pytest.raises(SourceError):
            policy.authorize(ref, "ns", {"username": "u", "password": "p"}, None)
    assert access.calls == 2
