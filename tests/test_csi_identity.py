"""CSI Identity over a real unix socket, and the interceptor's error mapping and redaction."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from weightcache.csi.errors import InvalidArgument, status_for
from weightcache.csi.identity import DRIVER_NAME, IdentityService
from weightcache.csi.interceptor import REDACTED, redacted
from weightcache.csi.server import socket_path, start_server
from weightcache.daemon import __version__
from weightcache.daemon.errors import InsufficientSpace, SourceError, public_message
from weightcache.proto import csi_pb2, csi_pb2_grpc


class Failing(csi_pb2_grpc.IdentityServicer):
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def GetPluginInfo(self, request, context):  # type: ignore[no-untyped-def]
        raise self.exc


def _serve_and_call(tmp_path: Path, servicer: csi_pb2_grpc.IdentityServicer, call):  # type: ignore[no-untyped-def]
    endpoint = f"unix://{tmp_path}/csi.sock"

    async def run():  # type: ignore[no-untyped-def]
        server = await start_server(
            endpoint, [lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(servicer, s)]
        )
        try:
            async with grpc.aio.insecure_channel(endpoint) as channel:
                return await call(csi_pb2_grpc.IdentityStub(channel))
        finally:
            await server.stop(grace=None)

    return asyncio.run(run())


def test_identity_over_a_unix_socket(tmp_path: Path) -> None:
    ready = {"value": False}
    svc = IdentityService(lambda: ready["value"])

    async def calls(stub):  # type: ignore[no-untyped-def]
        info = await stub.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
        caps = await stub.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
        before = await stub.Probe(csi_pb2.ProbeRequest())
        ready["value"] = True
        after = await stub.Probe(csi_pb2.ProbeRequest())
        return info, caps, before, after

    info, caps, before, after = _serve_and_call(tmp_path, svc, calls)
    assert (info.name, info.vendor_version) == (DRIVER_NAME, __version__)
    assert [c.service.type for c in caps.capabilities] == [
        csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE
    ]
    assert before.ready.value is False and after.ready.value is True


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgument("volume_id is required"), grpc.StatusCode.INVALID_ARGUMENT),
        (InsufficientSpace("needs 10 more bytes"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (SourceError("denied", reason="auth"), grpc.StatusCode.PERMISSION_DENIED),
        (RuntimeError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_domain_errors_become_grpc_codes_with_their_message(
    tmp_path: Path, exc: Exception, code: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    async def call(stub):  # type: ignore[no-untyped-def]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
        return info.value

    with caplog.at_level(logging.INFO, logger="weightcache.csi"):
        err = _serve_and_call(tmp_path, Failing(exc), call)
    assert err.code() == code
    # The caller reads the public form (a source's or the runtime's own words stay in the
    # log); what weightcache composed itself is passed as it is.
    assert err.details() == public_message(exc)
    assert (err.details() == str(exc)) == isinstance(exc, (InvalidArgument, InsufficientSpace))
    assert status_for(exc) == code
    (line,) = [r.getMessage() for r in caplog.records if "GetPluginInfo failed" in r.getMessage()]
    assert str(exc) in line


def test_secrets_are_never_in_the_log_line() -> None:
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id="v1",
        target_path="/pods/x",
        secrets={".dockerconfigjson": "hunter2"},
        volume_context={"model": "oci://r/m:v1"},
    )
    line = redacted(req)
    assert "hunter2" not in line
    assert f"secrets={REDACTED}" in line and "volume_id='v1'" in line and "oci://r/m:v1" in line


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:1", "unix://relative.sock", "/x.sock"])
def test_endpoints_must_be_absolute_unix_paths(endpoint: str) -> None:
    with pytest.raises(InvalidArgument, match=r"unix:///ABSOLUTE/PATH|absolute path"):
        socket_path(endpoint)
