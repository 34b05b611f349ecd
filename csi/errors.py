"""Domain exceptions -> gRPC status codes, in exactly this one place."""

from __future__ import annotations

import grpc

from weightcache.daemon.errors import (
    DigestMismatch,
    FetchInProgress,
    InsufficientSpace,
    InvalidReference,
    ModelCorrupt,
    NotCached,
    PolicyDenied,
    SourceError,
    UnsafeContent,
    UnsupportedManifest,
    WeightcacheError,
)
from weightcache.daemon.signing import SignatureInvalid, SignatureMissing


class InvalidArgument(WeightcacheError, ValueError):
    """A request field is missing or malformed; the message names the field."""


class AlreadyExists(WeightcacheError):
    """CreateVolume: the name is taken by a volume with other parameters."""


class NotFound(WeightcacheError):
    """A volume id this driver never issued."""


class OutOfRange(WeightcacheError):
    """CreateVolume: the capacity range cannot hold the model."""


class FailedPrecondition(WeightcacheError):
    """The request cannot be served in the state the node is in (e.g. a target holding a
    mount that is not this store's)."""


_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidReference, grpc.StatusCode.INVALID_ARGUMENT),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    # Before PolicyDenied, their base: the pod may have the model, the model does not meet
    # the node's signing rule; it will not until it is re-signed or the rule changes.
    (SignatureMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (SignatureInvalid, grpc.StatusCode.FAILED_PRECONDITION),
    (PolicyDenied, grpc.StatusCode.PERMISSION_DENIED),
    (InsufficientSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (FetchInProgress, grpc.StatusCode.UNAVAILABLE),
    (NotCached, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelCorrupt, grpc.StatusCode.FAILED_PRECONDITION),
    (UnsupportedManifest, grpc.StatusCode.FAILED_PRECONDITION),
    (UnsafeContent, grpc.StatusCode.FAILED_PRECONDITION),
    (DigestMismatch, grpc.StatusCode.UNAVAILABLE),
)
_SOURCE_CODES = {
    "auth": grpc.StatusCode.PERMISSION_DENIED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "invalid": grpc.StatusCode.FAILED_PRECONDITION,
    "changed": grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code a caller (the kubelet) should see for ``exc``."""
    if isinstance(exc, SourceError):
        return _SOURCE_CODES.get(exc.reason, grpc.StatusCode.UNAVAILABLE)
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL
