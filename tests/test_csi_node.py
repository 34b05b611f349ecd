"""CSI Node over a real unix socket with real read-only bind mounts and a real store."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from csi_harness import publish, serving_node, unpublish
from helpers import make_config

from weightcache.csi.mounter import FakeMounter, Mounter, SystemMounter
from weightcache.csi.node import NodeService
from weightcache.daemon.references import parse_reference
from weightcache.proto import csi_pb2, csi_pb2_grpc
from weightcache.testing.models import sample_model, write_files

Call = Callable[[csi_pb2_grpc.NodeStub, NodeService], Awaitable[Any]]


def run_node(tmp_path: Path, mounter: Mounter, call: Call, *, wait_s: float = 2.0) -> Any:
    async def main() -> Any:
        async with serving_node(
            tmp_path, make_config(tmp_path / "store"), mounter=mounter, wait_s=wait_s
        ) as h:
            return await call(h.stub, h.node)

    return asyncio.run(main())


@pytest.fixture
def model(tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    files = sample_model(70)
    return f"file://{write_files(tmp_path / 'src', files)}", files


def test_publish_mounts_read_only_and_unpublish_removes_it(
    tmp_path: Path, model: tuple[str, dict[str, bytes]]
) -> None:
    ref, files = model
    target = tmp_path / "kubelet" / "pods" / "p1" / "volumes" / "model"
    mounter = SystemMounter()

    async def call(stub: csi_pb2_grpc.NodeStub, node: NodeService) -> None:
        await asyncio.to_thread(node._fetcher.warm, parse_reference(ref))
        await stub.NodePublishVolume(publish(ref, target))
        await stub.NodePublishVolume(publish(ref, target))  # idempotent
        entry = mounter.mounts()[str(target)]
        assert {"ro", "nosuid", "nodev"} <= entry.options
        for rel, data in files.items():
            assert (target / rel).read_bytes() == data
        with pytest.raises(OSError) as exc:
            (target / "x").write_bytes(b"no")
        assert exc.value.errno == errno.EROFS
        pins = node._store.pins()
        assert [(k, h) for _, k, h in pins] == [("mount", str(target))]
        await stub.NodeUnpublishVolume(unpublish(target))
        await stub.NodeUnpublishVolume(unpublish(target))  # idempotent
        assert str(target) not in mounter.mounts()
        assert not target.exists()
        assert node._store.pins() == []

    run_node(tmp_path, mounter, call)


def test_not_cached_answers_unavailable_then_mounts(
    tmp_path: Path, model: tuple[str, dict[str, bytes]]
) -> None:
    ref, _ = model
    target = tmp_path / "kubelet" / "t"

    async def call(stub: csi_pb2_grpc.NodeStub, node: NodeService) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.NodePublishVolume(publish(ref, target))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "being fetched" in (exc.value.details() or "")
        await asyncio.to_thread(node._fetcher.warm, parse_reference(ref))  # the fetch finishes
        await stub.NodePublishVolume(publish(ref, target))  # the kubelet's retry
        assert str(target) in node._mounter.mounts()

    run_node(tmp_path, FakeMounter(), call, wait_s=0.0)


def test_cached_only_is_failed_precondition(
    tmp_path: Path, model: tuple[str, dict[str, bytes]]
) -> None:
    ref, _ = model

    async def call(stub: csi_pb2_grpc.NodeStub, node: NodeService) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.NodePublishVolume(
                publish(ref, tmp_path / "kubelet" / "t", fetch="CachedOnly")
            )
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not cached" in (exc.value.details() or "")
        assert node._store.models() == []  # nothing was fetched

    run_node(tmp_path, FakeMounter(), call)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.ClearField("volume_id"), "volume_id is required"),
        (lambda r: r.ClearField("target_path"), "target_path is required"),
        (lambda r: setattr(r, "target_path", "relative/dir"), "must be an absolute path"),
        (lambda r: r.ClearField("volume_capability"), "volume_capability is required"),
        (lambda r: r.volume_context.pop("model"), "'model' is required"),
        (lambda r: r.volume_context.__setitem__("verify", "x"), "'verify' must be"),
    ],
)
def test_publish_field_errors(tmp_path: Path, mutate: Callable[[Any], None], message: str) -> None:
    request = publish("file:///models/x", tmp_path / "kubelet" / "t")
    mutate(request)

    async def call(stub: csi_pb2_grpc.NodeStub, node: NodeService) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.NodePublishVolume(request)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (exc.value.details() or "")

    run_node(tmp_path, FakeMounter(), call)


def test_unpublish_of_an_unknown_target_succeeds(tmp_path: Path) -> None:
    async def call(stub: csi_pb2_grpc.NodeStub, node: NodeService) -> None:
        await stub.NodeUnpublishVolume(unpublish(tmp_path / "kubelet" / "never-published"))
        info = await stub.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert info.node_id == "node-1"

    run_node(tmp_path, FakeMounter(), call)
    assert not (tmp_path / "kubelet" / "never-published").exists()
