"""The store's vocabulary: model and blob states, pin kinds, how a model was obtained and what
its bytes were checked against. The index stores the values; everything else compares members,
never strings."""

from __future__ import annotations

from enum import StrEnum


class ModelState(StrEnum):
    FETCHING = "fetching"
    """Being fetched (or resolved and waiting to be); never under ``models/``."""
    READY = "ready"
    """Every byte checked and installed under ``models/<hex>``: mountable."""
    FAILED = "failed"
    """The last fetch failed; what it left in staging waits for a resume."""
    CORRUPT = "corrupt"
    """A file failed a re-check and was quarantined: refused to new mounts until repaired."""


class BlobState(StrEnum):
    OK = "ok"
    CORRUPT = "corrupt"
    """Quarantined after a re-check failed."""
    MISSING = "missing"
    """Recorded but gone from ``blobs/`` (found when the store opened)."""


class PinKind(StrEnum):
    MOUNT = "mount"
    """A pod's bind mount; the holder is the target path."""
    WARM = "warm"
    """A workload's warm request; the holder is ``Kind/namespace/name``."""


class Access(StrEnum):
    """How the node obtained a model, which decides who may mount it (docs/security.md)."""

    ANONYMOUS = "anonymous"
    """The origin serves it without credentials: public on this node."""
    CREDENTIALS = "credentials"
    """It needed credentials (the node's, a mirror's, a cloud role): mounted and warmed only
    for namespaces a policy rule grants it, or pods whose own pull secret opens it."""


class Trust(StrEnum):
    """What the bytes of a model were checked against when they were fetched."""

    DIGEST = "digest"
    """Every file against a digest its source announced (or hashed locally)."""
    FIRST_FETCH = "first-fetch"
    """Some file had no announced digest (an S3 object without a checksum or MD5 ETag): its
    bytes are taken as first fetched, and the scrubber keeps them as they were then."""
