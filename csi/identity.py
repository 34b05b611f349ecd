"""The CSI Identity service: who the plugin is, what it offers, and whether it is ready."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.wrappers_pb2 import BoolValue

from weightcache.csi.interceptor import Context
from weightcache.daemon import __version__
from weightcache.proto import csi_pb2, csi_pb2_grpc

DRIVER_NAME = "csi.weightcache.io"


class IdentityService(csi_pb2_grpc.IdentityServicer):
    """``ready`` answers Probe: true only once the store is open and reconciled."""

    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready

    async def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: Context
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: Context
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        # Capabilities describe the driver as a whole, on every endpoint: conformance tooling
        # reads them from the node socket too.
        service = csi_pb2.PluginCapability.Service(
            type=csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE
        )
        return csi_pb2.GetPluginCapabilitiesResponse(
            capabilities=[csi_pb2.PluginCapability(service=service)]
        )

    async def Probe(self, request: csi_pb2.ProbeRequest, context: Context) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=BoolValue(value=self._ready()))
