"""What the CSI node and the warm controller ask of the fetcher: start or join a model's
fetch, and read its progress. ``Fetcher`` is the real one; ``weightcache.testing.memory``
has one whose fetches finish when a test says so."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from weightcache.daemon.fetcher import Progress
from weightcache.daemon.plan import ModelPlan
from weightcache.daemon.references import ModelRef
from weightcache.daemon.store.index import ModelRow


class Fetches(Protocol):
    def warm_async(
        self, ref: ModelRef, admit: Callable[[ModelPlan], None] | None = None
    ) -> Future[ModelRow]:
        """Start (or join) the fetch of ``ref``; ``admit`` may refuse the resolved plan."""

    def progress(self, digest: str) -> Progress | None: ...
