"""The CSI Controller service, metadata only: dynamic PVCs through a StorageClass.

CreateVolume allocates nothing. It checks the StorageClass parameters (the same contract as
inline volume attributes), derives a deterministic volume id from the name and the parameters,
and hands the parameters back as volume_context, which the kubelet passes to NodePublishVolume.
The node does the real work; DeleteVolume has nothing to free.

Names seen by this process are remembered with the volume they were given (id and capacity),
so that a repeat is answered with the same volume and the same name with other parameters, or
with a capacity_range the volume does not meet, is ALREADY_EXISTS (CSI spec v1.12, CreateVolume).
The external-provisioner only repeats a name with the claim's parameters and size (StorageClass
parameters are immutable, the driver offers no expansion), so nothing needs to survive a
restart: a repeat after a restart gets the same id again. docs/csi.md holds the spec table.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from weightcache.csi.errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange
from weightcache.csi.interceptor import Context
from weightcache.csi.volume import VolumeAttributes, parse_volume_attributes
from weightcache.daemon.errors import WeightcacheError
from weightcache.daemon.references import ModelRef
from weightcache.proto import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)
VOLUME_ID = re.compile(r"^wc-[0-9a-f]{40}$")
ModelSize = Callable[[ModelRef], int]
"""Resolve a reference and return the model's size in bytes (may raise WeightcacheError)."""


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, model_size: ModelSize | None = None, size_timeout_s: float = 10.0) -> None:
        self._model_size = model_size
        self._size_timeout = size_timeout_s
        self._names: dict[str, _Created] = {}  # volume name -> the volume it was given
        self._lock = threading.Lock()

    async def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        rpc = csi_pb2.ControllerServiceCapability.RPC(
            type=csi_pb2.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME
        )
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[csi_pb2.ControllerServiceCapability(rpc=rpc)]
        )

    async def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: Context
    ) -> csi_pb2.CreateVolumeResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        _check_capabilities(request.volume_capabilities)
        if request.HasField("volume_content_source"):
            raise InvalidArgument("volume_content_source is not supported: models are read-only")
        if request.mutable_parameters:
            raise InvalidArgument(
                "mutable_parameters are not supported: the driver has no MODIFY_VOLUME capability"
            )
        required, limit = _capacity_range(request)
        attrs = parse_volume_attributes(request.parameters)
        volume_context = _volume_context(attrs)
        volume_id = volume_id_for(request.name, volume_context)
        with self._lock:
            known = self._names.get(request.name)
        if known is None:
            size = await self._size(attrs.model)
            if size is not None and limit and size > limit:
                raise OutOfRange(
                    f"model {attrs.model} holds {size} bytes, more than the limit of {limit} bytes"
                )
            # At least what was asked (the provisioner refuses a smaller volume), and the
            # model's size when that is more: the number is informational, the node mounts the
            # whole model.
            capacity = max(size or 0, required) or limit
            with self._lock:  # a concurrent first call may have won: answer with its volume
                known = self._names.setdefault(request.name, _Created(volume_id, capacity))
        if known.volume_id != volume_id:
            raise AlreadyExists(
                f"volume {request.name!r} already exists with other parameters ({known.volume_id})"
            )
        if required > known.capacity_bytes or (limit and known.capacity_bytes > limit):
            raise AlreadyExists(
                f"volume {request.name!r} already exists with {known.capacity_bytes} bytes, "
                f"outside the capacity_range asked for (required {required}, limit {limit or '-'})"
            )
        return csi_pb2.CreateVolumeResponse(
            volume=csi_pb2.Volume(
                volume_id=volume_id,
                capacity_bytes=known.capacity_bytes,
                volume_context=volume_context,
            )
        )

    async def _size(self, model: ModelRef) -> int | None:
        """The model's size when it can be learned quickly, else None (capacity falls back to
        what was requested: the number is informational, the node mounts the whole model)."""
        if self._model_size is None:
            return None
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._model_size, model), self._size_timeout
            )
        except (TimeoutError, WeightcacheError) as exc:
            log.info("size of %s unknown (%s); reporting the requested capacity", model, exc)
            return None

    async def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: Context
    ) -> csi_pb2.DeleteVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        with self._lock:
            for name in [n for n, v in self._names.items() if v.volume_id == request.volume_id]:
                del self._names[name]
        return csi_pb2.DeleteVolumeResponse()

    async def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: Context
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        _check_capabilities(request.volume_capabilities, block_ok=True)
        if not VOLUME_ID.match(request.volume_id):
            raise NotFound(f"volume {request.volume_id!r} was not created by this driver")
        if request.volume_context:
            parse_volume_attributes(request.volume_context)
        if request.parameters:
            parse_volume_attributes(request.parameters)
        if any(c.HasField("block") for c in request.volume_capabilities):
            return csi_pb2.ValidateVolumeCapabilitiesResponse(
                message="block access is not supported: models are mounted as files"
            )
        # Every access mode is confirmed: the node always mounts read-only, whatever is asked.
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)


@dataclass(frozen=True)
class _Created:
    """What a name was given: the answer every compatible repeat gets."""

    volume_id: str
    capacity_bytes: int


def volume_id_for(name: str, volume_context: Mapping[str, str]) -> str:
    """``wc-`` + 40 hex digits of sha256 over the name and the sorted parameters."""
    h = hashlib.sha256(name.encode())
    for key in sorted(volume_context):
        h.update(f"\x00{key}={volume_context[key]}".encode())
    return "wc-" + h.hexdigest()[:40]


def _volume_context(attrs: VolumeAttributes) -> dict[str, str]:
    """The contract keys with their defaults made explicit; the provisioner's per-claim
    metadata (``csi.storage.k8s.io/pvc/...``) names the claim, not the volume, and is dropped."""
    return {"model": str(attrs.model), "verify": attrs.verify, "fetch": attrs.fetch}


def _check_capabilities(
    caps: Iterable[csi_pb2.VolumeCapability], *, block_ok: bool = False
) -> None:
    items = list(caps)
    if not items:
        raise InvalidArgument("volume_capabilities is required")
    for i, cap in enumerate(items):
        if not cap.HasField("access_mode"):
            raise InvalidArgument(f"volume_capabilities[{i}].access_mode is required")
        if not cap.HasField("mount") and not cap.HasField("block"):
            raise InvalidArgument(f"volume_capabilities[{i}] needs an access type (mount)")
        if cap.HasField("block") and not block_ok:
            raise InvalidArgument(
                f"volume_capabilities[{i}]: block access is not supported: models are files"
            )


def _capacity_range(request: csi_pb2.CreateVolumeRequest) -> tuple[int, int]:
    if not request.HasField("capacity_range"):
        return 0, 0
    required = request.capacity_range.required_bytes
    limit = request.capacity_range.limit_bytes
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"capacity_range: required_bytes {required} > limit_bytes {limit}")
    return required, limit
