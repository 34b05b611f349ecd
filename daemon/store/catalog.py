"""The narrow view of the store that the CSI node and the warm controller decide with, in the
spirit of the host-path driver's state interface: look up what a reference names, pin a model
only if it is ready, and read the pins of a model or a holder. ``Store`` is the real one;
``weightcache.testing.memory.MemoryCatalog`` is an in-memory one for fast tests of those
decisions."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol

from weightcache.daemon.store.index import ModelRow


class Pin(NamedTuple):
    model: str
    kind: str
    """A :class:`~weightcache.daemon.store.states.PinKind` value."""
    holder: str


class Catalog(Protocol):
    @property
    def models_dir(self) -> Path:
        """Where the model trees live (``models/``): what the CSI node may unmount."""

    def cached_model(self, ref: str) -> ModelRow | None:
        """The model a reference resolved to last time, in whatever state; None if never."""

    def model(self, digest: str) -> ModelRow | None: ...

    def model_path(self, digest: str) -> Path: ...

    def refs(self) -> list[tuple[str, str]]:
        """Every (reference, digest) resolved."""

    def pin(self, digest: str, kind: str, holder: str) -> None:
        """Pin (idempotent); a pin is a use of the model."""

    def pin_if_ready(self, digest: str, kind: str, holder: str) -> bool:
        """Pin only if the model is ready, atomically with eviction; False when it is not."""

    def unpin(self, digest: str, kind: str, holder: str) -> None:
        """Drop a pin; an absent pin is not an error."""

    def pins(self, digest: str | None = None) -> list[tuple[str, str, str]]:
        """(model, kind, holder) of every pin, or of one model's."""

    def pins_of(self, holder: str) -> list[Pin]:
        """The pins one holder (a mount target, a workload) holds."""
