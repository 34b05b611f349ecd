"""Sources: resolve a reference to an immutable :class:`ModelPlan` and read byte ranges of it.

One registry keyed by scheme (``oci``, ``s3``, ``file``); each source implements :class:`Source`.
Sources know nothing of the store or the CSI plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from weightcache.daemon.errors import InvalidReference
from weightcache.daemon.plan import ModelPlan
from weightcache.daemon.references import ModelRef
from weightcache.daemon.sources.provenance import NoProof, Provenance


class Source(Protocol):
    """A place models come from."""

    def resolve(self, ref: ModelRef) -> ModelPlan:
        """Resolve ``ref`` (a tag, a prefix, a directory) to an immutable plan and its digest."""
        ...

    def read_into(
        self, ref: ModelRef, locator: str, version: str, start: int, buf: memoryview
    ) -> None:
        """Fill ``buf`` with exactly ``len(buf)`` bytes of the object at ``locator`` from
        ``start``. The caller owns and reuses the buffer, so reads allocate nothing.

        Raises :class:`SourceError` (``truncated`` when fewer bytes arrive); never leaves
        ``buf`` partly filled without raising.
        """
        ...


class Sources:
    """The registry of sources by scheme, each with what it can prove about provenance
    (:mod:`weightcache.daemon.sources.provenance`; a scheme without one proves nothing)."""

    def __init__(
        self,
        by_scheme: Mapping[str, Source],
        provenance: Mapping[str, Provenance] | None = None,
    ) -> None:
        self._by_scheme = dict(by_scheme)
        self._provenance = dict(provenance or {})

    def provenance(self, ref: ModelRef) -> Provenance:
        return self._provenance.get(ref.scheme) or NoProof()

    def for_ref(self, ref: ModelRef) -> Source:
        try:
            return self._by_scheme[ref.scheme]
        except KeyError:
            raise InvalidReference(f"no source configured for {ref.scheme}:// ({ref})") from None
