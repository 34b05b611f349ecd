"""In-memory implementations of the project's own seams, for fast tests of decisions: the
catalog (:class:`~weightcache.daemon.store.catalog.Catalog`), the fetches the CSI node and the
warm controller start (:class:`~weightcache.daemon.fetches.Fetches`), the repairer the node
calls and the few Kubernetes calls the warm controller makes
(:class:`~weightcache.daemon.kube.client.Kube`). The real ones are tested against real
services elsewhere; these let a test set up a state in microseconds and see every decision."""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from weightcache.daemon.errors import RepairFailed
from weightcache.daemon.fetcher import Progress
from weightcache.daemon.kube.client import Listing
from weightcache.daemon.plan import ModelPlan, RemoteFile
from weightcache.daemon.references import ModelRef
from weightcache.daemon.store.catalog import Pin
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.states import Access, ModelState, Trust
from weightcache.daemon.store.verify import Problem

JSON = dict[str, Any]


def model_row(
    ref: str, size: int = 1000, state: str = ModelState.READY, access: str = Access.ANONYMOUS
) -> ModelRow:
    """A model record for ``ref`` (its digest derived from the reference)."""
    now = time.time()
    return ModelRow(
        digest="sha256:" + hashlib.sha256(ref.encode()).hexdigest(),
        ref=ref,
        format="oras",
        state=state,
        size=size,
        files=1,
        created_at=now,
        last_used=now,
        ready_at=now if state == ModelState.READY else None,
        bytes_done=size,
        bytes_total=size,
        rate=0.0,
        error="",
        access=access,
        trust=Trust.DIGEST,
        repair_reason="",
        repair_error="",
        repair_failed_at=0.0,
    )


class MemoryCatalog:
    """Models, references and pins in dicts, with the store's pin semantics."""

    def __init__(self, models_dir: Path = Path("/nonexistent/models")) -> None:
        self._dir = models_dir
        self.models: dict[str, ModelRow] = {}
        self.resolved: dict[str, str] = {}
        self._pins: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def add(self, row: ModelRow) -> ModelRow:
        """Hold ``row`` (replacing any record of its digest) as what its reference names."""
        with self._lock:
            self.models[row.digest] = row
            self.resolved[row.ref] = row.digest
        return row

    def evict(self, digest: str) -> None:
        with self._lock:
            self.models.pop(digest, None)

    @property
    def models_dir(self) -> Path:
        return self._dir

    def cached_model(self, ref: str) -> ModelRow | None:
        digest = self.resolved.get(ref)
        return self.models.get(digest) if digest else None

    def model(self, digest: str) -> ModelRow | None:
        return self.models.get(digest)

    def model_path(self, digest: str) -> Path:
        return self._dir / digest.removeprefix("sha256:")

    def refs(self) -> list[tuple[str, str]]:
        return sorted(self.resolved.items())

    def pin(self, digest: str, kind: str, holder: str) -> None:
        with self._lock:
            self._pins.setdefault((digest, kind, holder), time.time())
            if digest in self.models:
                self.models[digest] = replace(self.models[digest], last_used=time.time())

    def pin_if_ready(self, digest: str, kind: str, holder: str) -> bool:
        row = self.models.get(digest)
        if row is None or row.state != ModelState.READY:
            return False
        self.pin(digest, kind, holder)
        return True

    def unpin(self, digest: str, kind: str, holder: str) -> None:
        with self._lock:
            self._pins.pop((digest, kind, holder), None)

    def pins(self, digest: str | None = None) -> list[tuple[str, str, str]]:
        return sorted(k for k in self._pins if digest is None or k[0] == digest)

    def pins_of(self, holder: str) -> list[Pin]:
        return [Pin(*k) for k in sorted(self._pins) if k[2] == holder]


@dataclass
class Started:
    """One fetch a test will finish (or fail)."""

    ref: ModelRef
    future: Future[ModelRow]
    admit: Callable[[ModelPlan], None] | None
    progress: Progress
    admitted: bool = False
    size: int = 1000


class ManualFetches:
    """Fetches that start when asked and finish when the test says: one per reference at a
    time, joined by later callers, as the real fetcher's are."""

    def __init__(self, catalog: MemoryCatalog) -> None:
        self._catalog = catalog
        self.started: list[Started] = []
        self._running: dict[str, Started] = {}

    def warm_async(
        self, ref: ModelRef, admit: Callable[[ModelPlan], None] | None = None
    ) -> Future[ModelRow]:
        key = str(ref)
        running = self._running.get(key)
        if running is not None and not running.future.done():
            return running.future
        start = Started(ref, Future(), admit, Progress(model_row(key).digest, key, 1000))
        self.started.append(start)
        self._running[key] = start
        return start.future

    def progress(self, digest: str) -> Progress | None:
        for s in self._running.values():
            if s.progress.digest == digest and not s.future.done():
                return s.progress
        return None

    def refs_started(self) -> list[str]:
        return [str(s.ref) for s in self.started]

    def resolve(self, ref: str, size: int = 1000) -> None:
        """The running fetch of ``ref`` resolves to a model of ``size`` bytes: its ``admit``
        hook is asked, as the real fetcher asks it before any content moves; a refusal fails
        the fetch."""
        start = self._running[ref]
        start.size = size
        if start.admit is None or start.admitted:
            return
        start.admitted = True
        plan = ModelPlan(
            start.ref, model_row(ref).digest, "oras", (RemoteFile("weights.bin", size, "memory"),)
        )
        try:
            start.admit(plan)
        except Exception as exc:
            start.future.set_exception(exc)

    def finish(self, ref: str, size: int = 1000) -> ModelRow | None:
        """The running fetch of ``ref`` succeeds (resolving first if it has not): its model
        is ready in the catalog. None when the admission refused it."""
        start = self._running[ref]
        self.resolve(ref, size)
        if start.future.done():
            return None
        row = self._catalog.add(model_row(ref, start.size))
        start.future.set_result(row)
        return row

    def fail(self, ref: str, exc: BaseException) -> None:
        self._running[ref].future.set_exception(exc)


@dataclass
class RecordingRepairs:
    """A repairer that records what it is told; ``failures`` is what :meth:`failure` answers."""

    damage: list[Problem] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    failures: dict[str, RepairFailed] = field(default_factory=dict)

    def damaged(self, problems: Sequence[Problem], *, repair: bool = True) -> None:
        self.damage.extend(problems)
        if repair:
            for digest in dict.fromkeys(p.model for p in problems):
                self.repair(digest)

    def repair(self, digest: str) -> Future[ModelRow]:
        self.repairs.append(digest)
        return Future()

    def failure(self, digest: str) -> RepairFailed | None:
        return self.failures.get(digest)


class MemoryKube:
    """Workloads, one Node and the Events posted, in memory. Lists are consistent snapshots;
    watches end at once (a test relists the controller's informers to show it a change)."""

    def __init__(self, node: JSON) -> None:
        self.node = copy.deepcopy(node)
        self.workloads: dict[tuple[str, str, str], JSON] = {}
        self.events: list[JSON] = []
        self._version = 1

    def put(self, obj: JSON) -> JSON:
        self._version += 1
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self._version)
        meta.setdefault("uid", hashlib.sha256(repr(sorted(meta.items())).encode()).hexdigest())
        meta["generation"] = int(meta.get("generation") or 0) + 1
        self.workloads[(obj["kind"], meta.get("namespace", ""), meta["name"])] = obj
        return obj

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.workloads.pop((kind, namespace, name), None)

    def labels(self, prefix: str = "") -> dict[str, str]:
        labels: dict[str, str] = self.node["metadata"].get("labels") or {}
        return {k: v for k, v in labels.items() if k.startswith(prefix)}

    def reasons(self) -> list[str]:
        return [str(e["reason"]) for e in self.events]

    # -- the Kube protocol ---------------------------------------------------------------------

    def list_workloads(self, kind: str) -> Listing:
        items = [copy.deepcopy(o) for (k, _, _), o in self.workloads.items() if k == kind]
        return Listing(items, str(self._version))

    def watch_workloads(
        self, kind: str, resource_version: str, timeout_s: int
    ) -> Iterator[tuple[str, JSON]]:
        return iter(())

    def get_node(self, name: str) -> JSON:
        self.node["metadata"]["resourceVersion"] = str(self._version)
        return copy.deepcopy(self.node)

    def watch_node(
        self, name: str, resource_version: str, timeout_s: int
    ) -> Iterator[tuple[str, JSON]]:
        return iter(())

    def patch_node_labels(self, name: str, labels: Mapping[str, str | None]) -> None:
        self._version += 1
        current = self.node["metadata"].setdefault("labels", {})
        for key, value in labels.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> None:
        self.events.append({**copy.deepcopy(dict(event)), "namespace": namespace})
