"""The real CSI servers on a temporary unix socket, for tests: ``async with serving_node(...)``.

Everything is the production code (store, fetcher, policy, services, interceptor, socket); a
test picks the mounter (real bind mounts by default) and the configuration.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from weightcache.app.wiring import build_fetcher, build_policy
from weightcache.csi.controller import ControllerService, ModelSize
from weightcache.csi.identity import IdentityService
from weightcache.csi.mounter import Mounter, SystemMounter
from weightcache.csi.node import NodeService, store_checks
from weightcache.csi.server import start_controller_server, start_node_server
from weightcache.daemon.config import Config, ScrubConfig
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.metrics import Metrics
from weightcache.daemon.repair import Repairer
from weightcache.daemon.scrubber import Scrubber
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import Problem
from weightcache.proto import csi_pb2, csi_pb2_grpc

AccessMode = csi_pb2.VolumeCapability.AccessMode


def mount_cap(mode: int = AccessMode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=AccessMode(mode=mode),  # type: ignore[arg-type]
    )


def publish(
    ref: str, target: Path, secrets: dict[str, str] | None = None, **context: str
) -> csi_pb2.NodePublishVolumeRequest:
    """What the kubelet sends for an inline volume (SINGLE_NODE_WRITER, readonly=false)."""
    return csi_pb2.NodePublishVolumeRequest(
        volume_id="vol-1",
        target_path=str(target),
        volume_capability=mount_cap(),
        readonly=False,
        volume_context={"model": ref, **context},
        secrets=secrets or {},
    )


def unpublish(target: Path) -> csi_pb2.NodeUnpublishVolumeRequest:
    return csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(target))


def mountinfo_entries(path: Path) -> int:
    """How many mounts the kernel has at ``path`` (stacked mounts count each)."""
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == str(path))


@dataclass
class NodeHarness:
    node: NodeService
    stub: csi_pb2_grpc.NodeStub
    identity: csi_pb2_grpc.IdentityStub
    store: Store
    fetcher: Fetcher
    mounter: Mounter
    repairer: Repairer


@contextlib.asynccontextmanager
async def serving_node(
    tmp_path: Path,
    config: Config,
    *,
    mounter: Mounter | None = None,
    wait_s: float = 2.0,
    ready: Callable[[], bool] = lambda: True,
) -> AsyncIterator[NodeHarness]:
    """The node plugin (Identity + Node) on ``tmp_path/node.sock``; afterwards every mount left
    under ``tmp_path`` is removed and the store closed."""
    mounter = mounter or SystemMounter()
    store = Store(config.store)
    fetcher = build_fetcher(config, store)
    repairer = Repairer(store, fetcher)
    node = NodeService(
        "node-1",
        store,
        fetcher,
        mounter,
        build_policy(config, fetcher.sources, fetcher.signatures),
        repairer,
        checks=store_checks(store),
        kubelet_dir=config.csi.kubelet_dir,
        aliases=config.registry.aliases,
        publish_wait_s=wait_s,
    )
    endpoint = f"unix://{tmp_path}/node.sock"
    server = await start_node_server(endpoint, IdentityService(ready), node)
    try:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            yield NodeHarness(
                node,
                csi_pb2_grpc.NodeStub(channel),
                csi_pb2_grpc.IdentityStub(channel),
                store,
                fetcher,
                mounter,
                repairer,
            )
    finally:
        await server.stop(grace=None)
        while leftovers := [t for t in mounter.mounts() if t.startswith(str(tmp_path))]:
            for target in leftovers:  # stacked mounts come back on the next round
                mounter.unmount(Path(target))
        fetcher.close()
        store.close()


@dataclass
class ControllerHarness:
    stub: csi_pb2_grpc.ControllerStub
    identity: csi_pb2_grpc.IdentityStub


@contextlib.asynccontextmanager
async def serving_controller(
    tmp_path: Path, model_size: ModelSize | None = None
) -> AsyncIterator[ControllerHarness]:
    """The controller plugin (Identity + Controller) on ``tmp_path/controller.sock``."""
    endpoint = f"unix://{tmp_path}/controller.sock"
    server = await start_controller_server(
        endpoint, IdentityService(lambda: True), ControllerService(model_size)
    )
    try:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            yield ControllerHarness(
                csi_pb2_grpc.ControllerStub(channel), csi_pb2_grpc.IdentityStub(channel)
            )
    finally:
        await server.stop(grace=None)


def quarantining_scrubber(
    h: NodeHarness,
    repairs: list[str] | None = None,
    repairer: Repairer | None = None,
    metrics: Metrics | None = None,
) -> Scrubber:
    """An unthrottled scrubber whose findings the repairer quarantines but does not repair;
    the models it would repair are appended to ``repairs``, so a test can check the state in
    between and start the repairs itself."""
    chosen = repairer or h.repairer

    def damaged(problems: Sequence[Problem]) -> None:
        chosen.damaged(problems, repair=False)
        if repairs is not None:
            repairs.extend(p.model for p in problems)

    return Scrubber(
        h.store, damaged, ScrubConfig(bytes_per_s=0), stop=threading.Event(), metrics=metrics
    )
