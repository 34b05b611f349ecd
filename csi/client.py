"""A small CSI client over the plugin's unix socket: what the kubelet sends, for the demo and
for poking a node by hand. Requests are built here so callers outside ``weightcache.csi`` never
touch the generated protobuf code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import grpc

from weightcache.proto import csi_pb2, csi_pb2_grpc


class CsiError(Exception):
    """The plugin answered with an error status."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class NodeClient:
    def __init__(self, endpoint: str) -> None:
        self._channel = grpc.aio.insecure_channel(endpoint)
        self._node = csi_pb2_grpc.NodeStub(self._channel)
        self._identity = csi_pb2_grpc.IdentityStub(self._channel)

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._channel.close(grace=None)

    async def ready(self) -> bool:
        probe = await self._identity.Probe(csi_pb2.ProbeRequest())
        return bool(probe.ready.value)

    async def publish(
        self,
        volume_id: str,
        target: Path,
        attributes: Mapping[str, str],
        secrets: Mapping[str, str] | None = None,
    ) -> None:
        """NodePublishVolume as the kubelet sends it for an inline volume."""
        mode = csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        request = csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id,
            target_path=str(target),
            volume_capability=csi_pb2.VolumeCapability(
                mount=csi_pb2.VolumeCapability.MountVolume(),
                access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
            ),
            volume_context=dict(attributes),
            secrets=dict(secrets or {}),
        )
        await self._call(self._node.NodePublishVolume(request))

    async def unpublish(self, volume_id: str, target: Path) -> None:
        request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        await self._call(self._node.NodeUnpublishVolume(request))

    @staticmethod
    async def _call(call: object) -> None:
        try:
            await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            raise CsiError(exc.code().name, exc.details() or "") from exc
