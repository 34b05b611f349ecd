"""Domain exceptions. Each says what went wrong in words an operator can act on.

The CSI plugin maps these to gRPC codes in exactly one place; the CLI maps them to exit codes.
"""

from __future__ import annotations


class WeightcacheError(Exception):
    """Base of every error weightcache raises on purpose."""


class InvalidReference(WeightcacheError, ValueError):
    """A model reference that does not parse."""


class UnsupportedManifest(WeightcacheError):
    """A manifest, media type or layer format weightcache does not accept."""


class UnsafeContent(WeightcacheError):
    """Content that would escape the model tree or is not a plain file or directory."""


class DigestMismatch(WeightcacheError):
    """Bytes that do not hash to the digest they were announced with."""


class SourceError(WeightcacheError):
    """A source failed to serve a request.

    ``reason`` is a short stable token used as a metric label (``not_found``, ``auth``,
    ``throttled``, ``server``, ``truncated``, ``network``, ``invalid``).
    ``retryable`` tells the fetcher whether another attempt can help.
    """

    def __init__(
        self, message: str, *, reason: str, retryable: bool = False, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
        self.status = status
        """The HTTP status the source answered with, when it answered."""


class InsufficientSpace(WeightcacheError):
    """A model does not fit in the store's budget even after evicting what may be evicted."""


class NotCached(WeightcacheError):
    """A model is not (yet) in the store."""


class ModelCorrupt(WeightcacheError):
    """A model holds a file that failed a re-check."""


class FetchInProgress(WeightcacheError):
    """A model is being fetched; the message carries the progress. Ask again shortly."""


class PolicyDenied(WeightcacheError):
    """The node's policy does not let this pod mount this model (namespace or credentials)."""


class RepairFailed(WeightcacheError):
    """A corrupt model could not be repaired from its source; ``reason`` is a short token (a
    :class:`SourceError` reason, or the failure's kind)."""

    def __init__(self, message: str, *, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason


class AgentFailed(WeightcacheError):
    """The node agent stopped because a background loop kept failing (the kubelet restarts
    it)."""


class QuotaExceeded(WeightcacheError):
    """A warm request over one of the node's quotas; the message names the limit."""


def public_message(exc: BaseException) -> str:
    """What a tenant may read about ``exc`` (a CSI error, an Event in its namespace).

    A source's own words (response bodies, header values, fields of a document served by a
    host the tenant chose) and anything about the node's files stay in the agent's log: a
    tenant must not turn the node into a reader of hosts it can name, or into an oracle for
    node paths. Messages weightcache composes itself from references, sizes, digests and
    codes are kept."""
    if isinstance(exc, SourceError):
        status = f" (HTTP {exc.status})" if exc.status else ""
        return (
            f"the model's source failed: {exc.reason}{status}; details are in the node agent's log"
        )
    if isinstance(exc, RepairFailed):
        return f"the repair failed ({exc.reason}); details are in the node agent's log"
    if isinstance(exc, UnsupportedManifest):
        return (
            "the model's manifest is not one weightcache accepts; details are in the node "
            "agent's log"
        )
    if isinstance(exc, WeightcacheError):
        return str(exc)
    return f"{type(exc).__name__} on the node; details are in the node agent's log"
