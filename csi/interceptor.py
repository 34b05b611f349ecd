"""One server interceptor for every CSI call: log the method (Probe at DEBUG), log each error
once, map domain exceptions to gRPC codes, and never log a field marked ``csi_secret``."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message

from weightcache.csi.errors import status_for
from weightcache.daemon.errors import public_message
from weightcache.proto import csi_pb2

log = logging.getLogger("weightcache.csi")
REDACTED = "***stripped***"
_SECRET: Any = csi_pb2.csi_secret  # the extension marking secret fields
if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Base = grpc.aio.ServerInterceptor[Any, Any]
else:  # the runtime classes are not generic
    Context = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler
    _Base = grpc.aio.ServerInterceptor


def redacted(msg: Message) -> str:
    """A one-line text form of ``msg`` with every csi_secret field (at any depth) stripped."""
    return " ".join(_fields(msg))


def _fields(msg: Message, prefix: str = "") -> list[str]:
    out = []
    for field, value in msg.ListFields():
        name = f"{prefix}{field.name}"
        if field.GetOptions().Extensions[_SECRET]:
            out.append(f"{name}={REDACTED}")
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            items = value if field.is_repeated else [value]
            for item in items:
                out += _fields(item, f"{name}.")
        else:
            out.append(f"{name}={dict(value) if hasattr(value, 'items') else value!r}")
    return out


class LoggingInterceptor(_Base):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        level = logging.DEBUG if method == "Probe" else logging.INFO
        inner: Any = handler.unary_unary

        async def call(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            log.log(level, "%s %s", method, redacted(request))
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                code = status_for(exc)
                log.log(
                    logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.WARNING,
                    "%s failed after %.3fs: %s: %s",
                    method,
                    time.perf_counter() - started,
                    code.name,
                    exc,
                    exc_info=code == grpc.StatusCode.INTERNAL,
                )
                # The log has the whole story; the caller (and the pod's events) only what a
                # tenant may read.
                await context.abort(code, public_message(exc))
                raise  # unreachable: abort raises

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
