"""The warm controller: fetch what the workloads that could land on this node ask for.

Level-based: informers keep local copies of Deployments, StatefulSets and this node, and every
change wakes one reconcile pass that compares what is wanted with what the store holds:

- wanted: for each workload carrying ``weightcache.io/warm`` with replicas whose pod template
  could schedule here (:mod:`scheduling`), each reference it names that the tenant policy grants
  the workload's namespace (the same decision as a publish, :mod:`weightcache.daemon.policy`)
  and that fits the quotas: references per workload, node labels, bytes per namespace. A
  refusal is a ``WarmDenied`` event naming the policy or the limit, and nothing is fetched;
- ready references get a ``warm`` pin held by the workload (``Kind/namespace/name``); others
  start or join their fetch (the fetcher's, so one fetch per model per node whoever asks);
- a workload's pins on models it no longer names are dropped, except during a rollout: until
  every model it now names is ready, the old ones stay pinned (and a pod mounting one holds its
  own ``mount`` pin for as long as it runs). Dropping a pin frees nothing; eviction does, later;
- node labels ``warm.weightcache.io/<hash>=true`` follow the store: present while the model of
  a wanted (or already labelled) reference is ready, removed when it leaves;
- a warm pin on a model no pod has mounted for ``idle_pin_s`` is released (the model becomes
  evictable) and not taken again until a pod mounts the model or the workload's spec changes;
- Events on the workload: WarmStarted, WarmReady (bytes, duration), WarmFailed (reason),
  WarmNoSpace and WarmDenied, each once per workload, reference and attempt, in words a tenant
  may read (no remote response body, no node path).

A pass is cheap and idempotent, so it also runs every ``resync_s`` to notice evictions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from weightcache.daemon.config import WarmConfig
from weightcache.daemon.errors import (
    InsufficientSpace,
    PolicyDenied,
    QuotaExceeded,
    WeightcacheError,
    public_message,
)
from weightcache.daemon.fetches import Fetches
from weightcache.daemon.kube.client import Kube, KubeError, Listing
from weightcache.daemon.kube.events import event_body
from weightcache.daemon.kube.informer import Informer, Lister, Object, Watcher
from weightcache.daemon.kube.naming import (
    LABEL_PREFIX,
    LABEL_VALUE,
    WARM_ANNOTATION,
    label_key,
    parse_warm_annotation,
)
from weightcache.daemon.kube.scheduling import eligible
from weightcache.daemon.plan import ModelPlan
from weightcache.daemon.policy import Policy
from weightcache.daemon.references import Aliases, ModelRef, parse_reference
from weightcache.daemon.store.catalog import Catalog
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.states import ModelState, PinKind
from weightcache.daemon.threads import Spawn, start_guarded

log = logging.getLogger(__name__)
EVENT_TRIES = 5
"""Passes an Event is offered to an API server that is unreachable or overloaded."""
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


@dataclass(frozen=True)
class Workload:
    kind: str
    namespace: str
    name: str
    uid: str
    resource_version: str
    generation: int = 0

    @property
    def holder(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


def holder_namespace(holder: str) -> str:
    """The namespace of a ``Kind/namespace/name`` pin holder."""
    return holder.split("/", 2)[1] if holder.count("/") >= 2 else ""


@dataclass
class Attempt:
    """One fetch of one reference started by this controller."""

    number: int
    started: float
    future: Future[ModelRow]
    ref: ModelRef
    error: BaseException | None = None
    retry_at: float = 0.0
    finished: float = 0.0


@dataclass
class _Wanted:
    ref: ModelRef
    by: list[Workload] = field(default_factory=list)


class WarmController:
    def __init__(
        self,
        node_name: str,
        client: Kube,
        store: Catalog,
        fetcher: Fetches,
        config: WarmConfig,
        policy: Policy,
        aliases: Aliases | None = None,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
    ) -> None:
        """``stop``: the process's one stop signal (a new one when None)."""
        self.node_name = node_name
        self._client = client
        self._store = store
        self._fetcher = fetcher
        self._config = config
        self._policy = policy
        self._aliases = aliases
        self._clock = clock
        # (ref, namespace) -> (retry after, denial): a refused namespace is not asked again
        # (a registry probe) on every pass.
        self._denied: dict[tuple[str, str], tuple[float, str]] = {}
        # (holder, ref) -> the workload generation whose idle pin was released.
        self._released: dict[tuple[str, str], int] = {}
        # ref -> (namespaces, bytes) admitted to fetch and not finished yet.
        self._reserved: dict[str, tuple[frozenset[str], int]] = {}
        self._reserve_lock = threading.Lock()
        self._stop = stop or threading.Event()
        self._wake = threading.Event()
        self._attempts: dict[str, Attempt] = {}
        # (holder, subject, reason) -> the attempt or digest last announced: bounded by what
        # is wanted, and a new attempt or digest announces again.
        self._announced: dict[tuple[str, str, str], str] = {}
        self._outbox: list[tuple[Workload, dict[str, Any], int]] = []
        self.passes = 0
        """Completed reconcile passes."""
        self._request_states: dict[str, int] = {}
        self._settled = threading.Condition()
        self.last_error = ""
        self.informers = {kind: self._workload_informer(kind) for kind in WORKLOAD_KINDS}
        self.informers["Node"] = self._informer(
            "Node", self._get_node, lambda rv, t: client.watch_node(node_name, rv, t)
        )
        self._thread: threading.Thread | None = None

    def _workload_informer(self, kind: str) -> Informer:
        return self._informer(
            kind,
            lambda: self._client.list_workloads(kind),
            lambda rv, t: self._client.watch_workloads(kind, rv, t),
        )

    def _informer(self, name: str, lister: Lister, watcher: Watcher) -> Informer:
        return Informer(
            name,
            lister,
            watcher,
            self.wake,
            stop=self._stop,
            delays=self._config.reconnect_delays,
            watch_timeout_s=self._config.watch_timeout_s,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, spawn: Spawn = start_guarded) -> None:
        for informer in self.informers.values():
            informer.start(spawn)
        self._thread = spawn(self._loop, "warm-controller")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reconciling. Informer threads end at their next event or watch timeout; they
        are daemons and hold nothing that needs closing."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def request_states(self) -> dict[str, int]:
        """Wanted models by state (ready, fetching, failed), as of the last pass."""
        return dict(self._request_states)

    def wake(self) -> None:
        self._wake.set()

    def _get_node(self) -> Listing:
        node = self._client.get_node(self.node_name)
        return Listing([node], str(node["metadata"]["resourceVersion"]))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._config.resync_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.reconcile()
                self.last_error = ""
            except KubeError as exc:
                # Labels or events could not be written; the next pass tries again.
                self.last_error = str(exc)
                log.warning("warm controller: %s; retrying", exc)
                self._stop.wait(self._config.reconnect_delays[0])
                self._wake.set()
            except Exception as exc:
                self.last_error = str(exc)
                log.exception("warm controller pass failed")
                self._stop.wait(self._config.reconnect_delays[-1])
                self._wake.set()
            finally:
                with self._settled:
                    self.passes += 1
                    self._settled.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate`` holds after a reconcile pass (or now); False on timeout.
        For callers that must act on a settled state rather than guess with a sleep."""
        with self._settled:
            return self._settled.wait_for(predicate, timeout)

    # -- one pass ------------------------------------------------------------------------------

    def reconcile(self) -> None:
        if not all(i.synced.is_set() for i in self.informers.values()):
            return  # decide on the whole picture only: a half-listed cluster would unpin
        nodes = self.informers["Node"].snapshot()
        if not nodes:
            return
        node = nodes[0]
        wanted, holders, annotated = self._wanted(node)
        labels: Mapping[str, str] = (node.get("metadata") or {}).get("labels") or {}
        ready: dict[str, ModelRow] = {}
        for key, want in wanted.items():
            row = self._ready_row(key)
            if row is not None:
                ready[key] = row
                self._announce_ready(want, row)
            elif self._label_room(labels, want):
                self._ensure_fetch(key, want)
        failed = sum(
            1
            for key in wanted
            if key not in ready
            and (a := self._attempts.get(key)) is not None
            and a.future.done()
            and a.future.exception() is not None
        )
        self._request_states = {
            "ready": len(ready),
            "failed": failed,
            "fetching": len(wanted) - len(ready) - failed,
        }
        try:
            self._sync_pins(wanted, holders, ready)
            self._sync_labels(node, wanted)
        finally:
            self._post_events()
        # Forget what concerns workloads and references no longer wanted here.
        self._announced = {k: v for k, v in self._announced.items() if k[0] in annotated}
        self._released = {k: v for k, v in self._released.items() if k[0] in annotated}
        now = self._clock()
        self._denied = {k: v for k, v in self._denied.items() if v[0] > now}
        with self._reserve_lock:
            for key in [k for k in self._reserved if k not in wanted]:
                del self._reserved[key]
        for key in [k for k, a in self._attempts.items() if k not in wanted and a.future.done()]:
            del self._attempts[key]

    def _wanted(self, node: Object) -> tuple[dict[str, _Wanted], dict[str, list[str]], set[str]]:
        """Reference -> the eligible workloads it is granted to; eligible holder -> the
        references it names; and every annotated workload, eligible or not."""
        wanted: dict[str, _Wanted] = {}
        holders: dict[str, list[str]] = {}
        annotated: set[str] = set()
        for kind in WORKLOAD_KINDS:
            for obj in self.informers[kind].snapshot():
                meta = obj.get("metadata") or {}
                annotation = (meta.get("annotations") or {}).get(WARM_ANNOTATION)
                if not annotation:
                    continue
                workload = Workload(
                    kind,
                    meta.get("namespace", ""),
                    meta.get("name", ""),
                    meta.get("uid", ""),
                    str(meta.get("resourceVersion", "")),
                    int(meta.get("generation") or 0),
                )
                annotated.add(workload.holder)
                spec = obj.get("spec") or {}
                if spec.get("replicas", 1) == 0:
                    continue  # no pod will run: nothing to warm, and its pins go
                request = parse_warm_annotation(annotation, self._aliases)
                for error in request.errors:
                    self._event(
                        workload, "WarmFailed", "Warning", f"{WARM_ANNOTATION}: {error}", error
                    )
                pod_spec = (spec.get("template") or {}).get("spec") or {}
                verdict = eligible(pod_spec, node)
                if not verdict.eligible:
                    log.debug("%s not eligible on %s: %s", workload.holder, self.node_name, verdict)
                    continue
                limit = self._config.refs_per_workload
                if len(request.refs) > limit:
                    self._deny(
                        workload,
                        f"{len(request.refs)} references",
                        f"the annotation names {len(request.refs)} references; this node warms "
                        f"at most {limit} per workload ([warm] refs_per_workload)",
                    )
                    holders[workload.holder] = []
                    continue
                granted = [ref for ref in request.refs if self._granted(workload, ref)]
                holders[workload.holder] = [str(r) for r in granted]
                for ref in granted:
                    wanted.setdefault(str(ref), _Wanted(ref)).by.append(workload)
        return wanted, holders, annotated

    def _granted(self, workload: Workload, ref: ModelRef) -> bool:
        """The tenant policy for the workload's namespace, and no released idle pin."""
        key = str(ref)
        released = self._released.get((workload.holder, key))
        if released is not None:
            row = self._store.cached_model(key)
            mounted = row is not None and any(
                kind != PinKind.WARM for _, kind, _ in self._store.pins(row.digest)
            )
            if released == workload.generation and not mounted:
                return False
            del self._released[(workload.holder, key)]  # used again, or the workload changed
        now = self._clock()
        denied = self._denied.get((key, workload.namespace))
        if denied is None or denied[0] <= now:
            try:
                self._policy.authorize(ref, workload.namespace, {}, self._store.cached_model(key))
                self._denied.pop((key, workload.namespace), None)
                return True
            except PolicyDenied as exc:
                denied = (now + self._config.retry_failed_s, str(exc))
                self._denied[(key, workload.namespace)] = denied
        self._deny(workload, key, denied[1])
        return False

    def _deny(self, workload: Workload, subject: str, why: str) -> None:
        self._event(
            workload,
            "WarmDenied",
            "Warning",
            f"not warming on node {self.node_name}: {why}",
            subject,
            once_per=why,
        )

    def _ready_row(self, ref: str) -> ModelRow | None:
        row = self._store.cached_model(ref)
        return row if row is not None and row.state == ModelState.READY else None

    def _label_room(self, labels: Mapping[str, str], want: _Wanted) -> bool:
        """Whether the node can carry one more warm label for ``want`` once it is ready."""
        key = label_key(want.ref)
        mine = {k for k in labels if k.startswith(LABEL_PREFIX)}
        if key in mine:
            return True
        coming = {label_key(a.ref) for a in self._attempts.values() if not a.future.done()}
        if key in coming or len(mine | coming) < self._config.labels_per_node:
            return True
        for w in want.by:
            self._deny(
                w,
                str(want.ref),
                f"{want.ref}: the node carries {len(mine)} warm labels, the most it may "
                f"([warm] labels_per_node = {self._config.labels_per_node})",
            )
        return False

    def _ensure_fetch(self, key: str, want: _Wanted) -> None:
        attempt = self._attempts.get(key)
        now = time.monotonic()
        if attempt is not None and not attempt.future.done():
            return
        if attempt is not None and attempt.future.exception() is not None:
            attempt.error = attempt.future.exception()  # the callback may not have run yet
            attempt.retry_at = attempt.retry_at or now + self._config.retry_failed_s
            self._announce_failure(want, attempt)
            if now < attempt.retry_at:
                return
        number = attempt.number + 1 if attempt else 1
        namespaces = frozenset(w.namespace for w in want.by)
        future = self._fetcher.warm_async(want.ref, lambda plan: self._admit(key, namespaces, plan))
        attempt = Attempt(number, now, future, want.ref)
        self._attempts[key] = attempt
        future.add_done_callback(lambda f: self._finished(key, attempt, f))
        for w in want.by:
            self._event(
                w, "WarmStarted", "Normal", f"fetching {want.ref} to node {self.node_name}", key
            )

    def _finished(self, key: str, attempt: Attempt, future: Future[ModelRow]) -> None:
        attempt.finished = time.monotonic()
        exc = future.exception()
        if exc is not None:
            with self._reserve_lock:  # a model that arrived keeps its share until pinned
                self._reserved.pop(key, None)
            attempt.error = exc
            attempt.retry_at = time.monotonic() + self._config.retry_failed_s
        self.wake()

    # -- quotas --------------------------------------------------------------------------------

    def _admit(self, key: str, namespaces: frozenset[str], plan: ModelPlan) -> None:
        """Before any content moves (the fetcher's admission hook): at least one namespace
        asking must have room for the model under ``namespace_bytes``."""
        limit = self._config.namespace_bytes
        if not limit:
            return
        with self._reserve_lock:
            fits = [
                ns
                for ns in namespaces
                if self._namespace_bytes(ns, exclude=plan.digest) + plan.total_bytes <= limit
            ]
            if not fits:
                raise QuotaExceeded(
                    f"{plan.ref} ({plan.total_bytes} bytes) would take namespace "
                    f"{', '.join(sorted(namespaces))} past the {limit} bytes of warm models it "
                    "may hold on this node ([warm] namespace_bytes)"
                )
            self._reserved[key] = (frozenset(fits), plan.total_bytes)

    def _namespace_bytes(self, namespace: str, exclude: str = "", key: str = "") -> int:
        """Bytes of distinct models a namespace's warm pins hold (but ``exclude``), plus its
        admitted fetches (but ``key``'s), which count until their model is pinned."""
        digests = {
            m
            for m, kind, holder in self._store.pins()
            if kind == PinKind.WARM and holder_namespace(holder) == namespace and m != exclude
        }
        held = sum(row.size for d in digests if (row := self._store.model(d)) is not None)
        return held + sum(
            size for k, (ns, size) in self._reserved.items() if namespace in ns and k != key
        )

    # -- pins ----------------------------------------------------------------------------------

    def _sync_pins(
        self,
        wanted: Mapping[str, _Wanted],
        holders: Mapping[str, list[str]],
        ready: Mapping[str, ModelRow],
    ) -> None:
        current = {(m, h) for m, k, h in self._store.pins() if k == PinKind.WARM}
        limit = self._config.namespace_bytes
        want_pins: set[tuple[str, str]] = set()
        for key, want in wanted.items():
            if key not in ready:
                continue
            row = ready[key]
            for w in want.by:
                pin = (row.digest, w.holder)
                if pin not in current and self._idle(row):
                    continue  # never pin a model nobody has used for the idle time
                if pin in current:
                    want_pins.add(pin)
                    continue
                with self._reserve_lock:
                    used = self._namespace_bytes(w.namespace, exclude=row.digest, key=key)
                if limit and used + row.size > limit:
                    self._deny(
                        w,
                        key,
                        f"{want.ref} ({row.size} bytes) would take namespace {w.namespace} past "
                        f"the {limit} bytes of warm models it may hold on this node "
                        "([warm] namespace_bytes)",
                    )
                    continue
                self._store.pin(row.digest, PinKind.WARM, w.holder)
                current.add(pin)
                want_pins.add(pin)
            with self._reserve_lock:  # pinned (or refused) now: the pins count from here
                self._reserved.pop(key, None)
        for digest, holder in current - want_pins:
            names = holders.get(holder)
            if names and not all(n in ready for n in names):
                continue  # a rollout in progress: keep the old version until the new is ready
            self._store.unpin(digest, PinKind.WARM, holder)
            log.info("%s no longer wants %s on this node: unpinned", holder, digest)
        self._release_idle(wanted, ready)

    def _idle(self, row: ModelRow) -> bool:
        idle = self._config.idle_pin_s
        if not idle or row.last_used > self._clock() - idle:
            return False
        return all(kind == PinKind.WARM for _, kind, _ in self._store.pins(row.digest))

    def _release_idle(self, wanted: Mapping[str, _Wanted], ready: Mapping[str, ModelRow]) -> None:
        """Drop warm pins on models no pod has mounted for ``idle_pin_s``: a workload whose pods
        never come here must not hold the node's disk forever."""
        for key, want in wanted.items():
            row = ready.get(key)
            if row is None or not self._idle(row):
                continue
            for w in want.by:
                self._store.unpin(row.digest, PinKind.WARM, w.holder)
                self._released[(w.holder, key)] = w.generation
                log.info(
                    "%s: released the warm pin of %s, unused for %.0fs",
                    w.holder,
                    key,
                    self._config.idle_pin_s,
                )

    # -- labels --------------------------------------------------------------------------------

    def _sync_labels(self, node: Object, wanted: Mapping[str, _Wanted]) -> None:
        labels: Mapping[str, str] = (node.get("metadata") or {}).get("labels") or {}
        current = {k: v for k, v in labels.items() if k.startswith(LABEL_PREFIX)}
        refs_by_key: dict[str, str] = {}
        for ref, _ in self._store.refs():
            try:
                refs_by_key[label_key(parse_reference(ref))] = ref
            except WeightcacheError:
                continue
        for key, want in wanted.items():
            refs_by_key[label_key(want.ref)] = key
        candidates = {label_key(w.ref) for w in wanted.values()} | set(current)
        desired = {k for k in candidates if k in refs_by_key and self._ready_row(refs_by_key[k])}
        # The quota: labels already set keep their place; new ones fill what is left.
        room = self._config.labels_per_node - len(desired & set(current))
        desired = (desired & set(current)) | set(sorted(desired - set(current))[: max(room, 0)])
        patch: dict[str, str | None] = {
            k: LABEL_VALUE for k in desired if current.get(k) != LABEL_VALUE
        }
        patch.update({k: None for k in current if k not in desired})
        if patch:
            self._client.patch_node_labels(self.node_name, patch)
            log.info("node %s labels: %s", self.node_name, patch)

    # -- events --------------------------------------------------------------------------------

    def _announce_ready(self, want: _Wanted, row: ModelRow) -> None:
        attempt = self._attempts.get(str(want.ref))
        took = (
            f" in {attempt.finished - attempt.started:.1f}s"
            if attempt is not None and attempt.finished
            else " (already cached)"
        )
        for w in want.by:
            self._event(
                w,
                "WarmReady",
                "Normal",
                f"{want.ref} is ready on node {self.node_name}: {row.size} bytes{took}; "
                f"node label {label_key(want.ref)}={LABEL_VALUE}",
                str(want.ref),
                once_per=row.digest,
            )

    def _announce_failure(self, want: _Wanted, attempt: Attempt) -> None:
        reason = "WarmFailed"
        if isinstance(attempt.error, InsufficientSpace):
            reason = "WarmNoSpace"
        elif isinstance(attempt.error, QuotaExceeded):
            reason = "WarmDenied"
        error = public_message(attempt.error) if attempt.error is not None else "unknown"
        for w in want.by:
            self._event(
                w,
                reason,
                "Warning",
                f"cannot warm {want.ref} on node {self.node_name}: {error}",
                str(want.ref),
                attempt=attempt.number,
            )

    def _event(
        self,
        workload: Workload,
        reason: str,
        kind: str,
        message: str,
        subject: str,
        *,
        attempt: int = 0,
        once_per: str = "",
    ) -> None:
        key = (workload.holder, subject, reason)
        marker = f"{attempt}\x00{once_per}"
        if self._announced.get(key) == marker:
            return
        self._announced[key] = marker
        involved = {
            "apiVersion": "apps/v1",
            "kind": workload.kind,
            "name": workload.name,
            "namespace": workload.namespace,
            "uid": workload.uid,
            "resourceVersion": workload.resource_version,
        }
        event = event_body(involved, workload.namespace, self.node_name, reason, kind, message)
        self._outbox.append((workload, event, 1))

    def _post_events(self) -> None:
        """Best effort, after pins and labels: an Event the API refuses (a quota, a namespace
        being deleted) must not hold back the state of every other workload."""
        outbox, self._outbox = self._outbox, []
        for workload, event, tries in outbox:
            try:
                self._client.create_event(workload.namespace, event)
                log.info("event %s on %s: %s", event["reason"], workload.holder, event["message"])
            except KubeError as exc:
                passing = exc.status == 0 or exc.status == 429 or exc.status >= 500
                if passing and tries < EVENT_TRIES:
                    self._outbox.append((workload, event, tries + 1))  # the next pass retries
                else:
                    log.warning(
                        "event %s on %s not posted: %s", event["reason"], workload.holder, exc
                    )
