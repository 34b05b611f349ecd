"""The CSI gRPC server on a unix socket: endpoint parsing and lifecycle."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc

from weightcache.csi.errors import InvalidArgument
from weightcache.csi.interceptor import LoggingInterceptor
from weightcache.proto import csi_pb2_grpc

Registrar = Callable[[grpc.aio.Server], None]


def socket_path(endpoint: str) -> Path:
    """``unix:///abs/path.sock`` -> the path; anything else is refused."""
    if not endpoint.startswith("unix://"):
        raise InvalidArgument(f"CSI endpoint {endpoint!r} must be unix:///ABSOLUTE/PATH")
    path = endpoint.removeprefix("unix://")
    if not path.startswith("/"):
        raise InvalidArgument(f"CSI endpoint {endpoint!r} must name an absolute path")
    return Path(path)


async def start_server(endpoint: str, registrars: list[Registrar]) -> grpc.aio.Server:
    """Bind a new server on ``endpoint`` (removing a stale socket), register services, start."""
    path = socket_path(endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        os.unlink(path)  # left by a previous run; the kubelet reconnects to the new one
    server = grpc.aio.server(interceptors=[LoggingInterceptor()])
    for register in registrars:
        register(server)
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    return server


async def start_node_server(
    endpoint: str, identity: csi_pb2_grpc.IdentityServicer, node: csi_pb2_grpc.NodeServicer
) -> grpc.aio.Server:
    """The node plugin's socket: Identity and Node."""
    return await start_server(
        endpoint,
        [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
            lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s),
        ],
    )


async def start_controller_server(
    endpoint: str,
    identity: csi_pb2_grpc.IdentityServicer,
    controller: csi_pb2_grpc.ControllerServicer,
) -> grpc.aio.Server:
    """The controller plugin's socket: Identity and Controller."""
    return await start_server(
        endpoint,
        [
            lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(identity, s),
            lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s),
        ],
    )
