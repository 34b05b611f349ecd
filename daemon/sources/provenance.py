"""What a source can prove about a model without sending its bytes.

Two questions decide tenant isolation on a shared node (docs/security.md):

- *Is the model public?* A model the origin serves without credentials is public on the node;
  one that needed credentials is mounted only where the policy grants it. For OCI this is an
  anonymous HEAD of the manifest at the origin (never a mirror: a mirror serves what other
  nodes pulled with credentials). Local directories under the configured roots are public on
  the node; S3 always needs the node's credentials.
- *Does this repository hold that blob?* A manifest may name any digest, including one another
  tenant's model brought to the node, and a registry may serve, under its own name, the very
  manifest of a model another repository brought. A held blob is linked for a new model, and a
  held model served for a new repository, only when the requesting repository shows it has the
  blobs (an OCI HEAD with this fetch's credentials, at the origin, with the declared size);
  else the blob is fetched like any other, and the held model is refused for that repository.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from weightcache.daemon.errors import SourceError
from weightcache.daemon.references import ModelRef, OciRef
from weightcache.daemon.sources.oci_http import MANIFEST_ACCEPT, RegistryHTTP

log = logging.getLogger(__name__)
PROOF_TTL_S = 3600.0
"""How long a repository's proof of holding a blob is remembered."""
MAX_PROOFS = 65536


class Provenance(Protocol):
    def anonymous(self, ref: ModelRef, manifest: str) -> bool:
        """True when the origin serves the model (``manifest``: its digest, or the tag before
        it is resolved) without any credentials."""
        ...

    def holds(self, ref: ModelRef, sha256: str, size: int) -> bool:
        """True when ``ref``'s repository shows it holds this content (its sha256, at its
        declared size) without the bytes being sent."""
        ...


class NoProof:
    """For sources that can prove neither (S3: every read uses the node's credentials)."""

    def anonymous(self, ref: ModelRef, manifest: str) -> bool:
        return False

    def holds(self, ref: ModelRef, sha256: str, size: int) -> bool:
        return False


class LocalProvenance:
    """Local directories: public on the node (the policy admits only configured roots), and
    every file's sha256 was computed from its bytes while resolving."""

    def anonymous(self, ref: ModelRef, manifest: str) -> bool:
        return True

    def holds(self, ref: ModelRef, sha256: str, size: int) -> bool:
        return True


class OciProvenance:
    def __init__(
        self,
        node_http: RegistryHTTP,
        anonymous_http: RegistryHTTP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._node = node_http
        self._anonymous = anonymous_http
        self._clock = clock
        self._proofs: dict[tuple[str, str, str, int], float] = {}  # -> expiry
        self._lock = threading.Lock()

    def anonymous(self, ref: ModelRef, manifest: str) -> bool:
        assert isinstance(ref, OciRef)
        return self._head(self._anonymous, ref, f"manifests/{manifest}", None)

    def holds(self, ref: ModelRef, sha256: str, size: int) -> bool:
        assert isinstance(ref, OciRef)
        key = (ref.registry, ref.repository, sha256, size)
        now = self._clock()
        with self._lock:
            if self._proofs.get(key, 0.0) > now:
                return True
        if not self._head(self._node, ref, f"blobs/{sha256}", size):
            return False
        with self._lock:
            if len(self._proofs) >= MAX_PROOFS:
                self._proofs = {k: v for k, v in self._proofs.items() if v > now}
                if len(self._proofs) >= MAX_PROOFS:
                    self._proofs.clear()
            self._proofs[key] = now + PROOF_TTL_S
        return True

    @staticmethod
    def _head(http: RegistryHTTP, ref: OciRef, tail: str, size: int | None) -> bool:
        origin = http.endpoints(ref, resolving=False)[-1]
        try:
            resp = http.request(
                ref, origin, "HEAD", origin.url(ref, tail), {"Accept": MANIFEST_ACCEPT}
            )
        except SourceError as exc:
            log.info("%s: the origin does not show %s (%s)", ref, tail, exc)
            return False
        length = resp.headers.get("Content-Length")
        if size is not None and length != str(size):
            log.warning(
                "%s: the origin reports %s at %s bytes, the manifest declares %d",
                ref,
                tail,
                length,
                size,
            )
            return False
        return True
