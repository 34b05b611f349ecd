"""The CSI Node service: publish a cached model read-only at a pod's target path, and back.

Every handler has the same shape: validate each required field with its own INVALID_ARGUMENT
message, take the lock of the target path (not a global one), act, record. Publish and
unpublish are idempotent by target path.

Publish order matters: parse, authorize (namespace, then the pod's pull secret), and only then
look up, fetch or mount; a pod the policy refuses never causes a download. Before binding, the
model's files are checked (``verify: fast`` metadata, ``full`` content, remembered until a file
changes); a failed check quarantines the file, refuses the mount and starts the repair.

A publish never waits on a download for more than ``publish_wait_s``: it starts (or joins) the
fetch and answers UNAVAILABLE with the progress, and the kubelet's retry mounts the model once
it is ready.

Both act only on target paths under the kubelet's directory with no symlink below it, and
unpublish unmounts only mounts of this store's model trees.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from weightcache.csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from weightcache.csi.interceptor import Context
from weightcache.csi.mounter import MountEntry, Mounter, device_of
from weightcache.csi.volume import VolumeAttributes, parse_volume_attributes
from weightcache.daemon.errors import FetchInProgress, ModelCorrupt, NotCached, public_message
from weightcache.daemon.fetches import Fetches
from weightcache.daemon.metrics import Metrics
from weightcache.daemon.policy import Policy
from weightcache.daemon.references import Aliases
from weightcache.daemon.repair import Repairs
from weightcache.daemon.store.catalog import Catalog
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.states import ModelState, PinKind
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import ModelCheck, check_model
from weightcache.proto import csi_pb2, csi_pb2_grpc

_TREE = re.compile(r"/models/[0-9a-f]{64}$")
T = TypeVar("T")
Checks = Callable[[str, bool], ModelCheck]
"""The check a publish runs on a model before binding it: (digest, full) -> what it found."""


def store_checks(store: Store) -> Checks:
    """A publish's checks on a real store: ``fast`` metadata, or ``full`` content, which skips
    files whose last full re-hash passed and whose metadata has not changed since."""
    return lambda digest, full: check_model(store, digest, full=full, remembered=True)


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(
        self,
        node_id: str,
        catalog: Catalog,
        fetcher: Fetches,
        mounter: Mounter,
        policy: Policy,
        repairer: Repairs,
        *,
        checks: Checks,
        kubelet_dir: Path,
        aliases: Aliases | None = None,
        publish_wait_s: float = 2.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._node_id = node_id
        self._kubelet_dir = kubelet_dir
        self._kubelet_real = Path(os.path.realpath(kubelet_dir))
        self._store_device = device_of(catalog.models_dir)  # the open store's filesystem
        self._aliases = aliases
        self._store = catalog
        self._checks = checks
        self._fetcher = fetcher
        self._mounter = mounter
        self._policy = policy
        self._repairer = repairer
        self._metrics = metrics or Metrics()
        self._wait = publish_wait_s
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def _serialized(self, target: Path) -> AsyncIterator[None]:
        """One call at a time per target path; a lock lives only while someone holds or waits
        for it, so a node that has served a million pods keeps no million locks."""
        key = str(target)
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._lock_users[key] -= 1
            if not self._lock_users[key]:
                del self._lock_users[key], self._locks[key]

    @property
    def policy(self) -> Policy:
        """The tenant policy, which the warm controller shares."""
        return self._policy

    def reconcile(self) -> list[str]:
        """On start: drop mount pins whose mount is gone (a reboot, a manual umount). Nothing is
        re-mounted silently; the kubelet publishes again if the pod still needs it. Returns the
        targets whose pins were dropped."""
        mounted = self._mounter.mounts()
        dropped = []
        for model, kind, holder in self._store.pins():
            if kind == PinKind.MOUNT and holder not in mounted:
                self._store.unpin(model, kind, holder)
                dropped.append(holder)
        return dropped

    async def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: Context
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self._node_id)

    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[])

    # -- publish -------------------------------------------------------------------------------

    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: Context
    ) -> csi_pb2.NodePublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        target = self._target(request.target_path)
        if not request.HasField("volume_capability"):
            raise InvalidArgument("volume_capability is required")
        if request.volume_capability.HasField("block"):
            raise InvalidArgument("block access is not supported: models are mounted as files")
        # The kubelet sends SINGLE_NODE_WRITER (and readonly=false) for inline volumes:
        # every access mode is accepted, and the mount is read-only whatever is asked.
        attrs = parse_volume_attributes(request.volume_context, self._aliases)
        secrets = dict(request.secrets)
        started = time.perf_counter()
        result = "error"
        try:
            async with self._serialized(target):
                # A hit is one trip to a thread (the index is SQLite, never read on the event
                # loop): each hop to a thread and back waits for a CPU and the GIL, which a
                # fetch running beside it keeps busy.
                cached, hit = await _to_thread_to_the_end(
                    self._publish_if_ready, attrs, secrets, target
                )
                if not hit:
                    row = await self._ready_model(attrs, cached)
                    await _to_thread_to_the_end(self._publish, row.digest, target, attrs)
            result = "hit" if hit else "miss"
        except (FetchInProgress, NotCached):
            result = "miss"  # not in the cache: a fetch was started or joined, or is forbidden
            raise
        finally:
            self._metrics.publish.labels(result).inc()
            self._metrics.publish_duration.observe(time.perf_counter() - started)
        return csi_pb2.NodePublishVolumeResponse()

    def _publish_if_ready(
        self, attrs: VolumeAttributes, secrets: Mapping[str, str], target: Path
    ) -> tuple[ModelRow | None, bool]:
        """Authorize, then publish the model if it is ready. Returns its record (None when the
        reference was never resolved here) and whether it was published."""
        cached = self._store.cached_model(str(attrs.model))
        self._policy.authorize(attrs.model, attrs.pod_namespace, secrets, cached)
        if cached is None or cached.state != ModelState.READY:
            return cached, False
        self._publish(cached.digest, target, attrs)
        return cached, True

    async def _ready_model(self, attrs: VolumeAttributes, row: ModelRow | None) -> ModelRow:
        """The model, not ready when looked up (``row``, None when never resolved): refused if
        corrupt or CachedOnly, else fetched, waiting at most ``publish_wait_s``."""
        ref = str(attrs.model)
        digest = row.digest if row is not None else None
        if row is not None and row.state == ModelState.CORRUPT:
            await asyncio.to_thread(self._repair, attrs, row.digest)
            # The damage is the store's own words (a relative path and what differs); why a
            # repair failed may quote a source, so it is told in public words only.
            failure = await asyncio.to_thread(self._repairer.failure, row.digest)
            repair = f"; repair failed: {public_message(failure)}" if failure else ""
            raise ModelCorrupt(
                f"model {ref} ({row.digest}) failed a re-check: {row.error}{repair}; "
                "it is refused until it is repaired"
            )
        if attrs.fetch == "CachedOnly":
            raise NotCached(f"model {ref} is not cached on this node and fetch is CachedOnly")
        fut: Future[ModelRow] = self._fetcher.warm_async(attrs.model)
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), self._wait)
        raise FetchInProgress(self._progress_message(ref, digest))

    def _progress_message(self, ref: str, digest: str | None) -> str:
        progress = self._fetcher.progress(digest) if digest else None
        if progress is None:
            return f"model {ref} is being fetched to this node; retry shortly"
        pct = 100.0 * progress.done / progress.total if progress.total else 0.0
        eta = f", ETA {progress.eta:.0f}s" if progress.eta is not None else ""
        last = f", last error: {progress.last_error_public}" if progress.last_error else ""
        return (
            f"model {ref} is being fetched to this node: {progress.done} of "
            f"{progress.total} bytes ({pct:.0f}%), {progress.rate / 1e6:.0f} MB/s{eta}{last}"
        )

    def _repair(self, attrs: VolumeAttributes, digest: str) -> None:
        """Start (or join) the repair of a corrupt model, unless the volume forbids fetching
        on demand."""
        if attrs.fetch == "IfNotCached":
            self._repairer.repair(digest)

    def _publish(self, digest: str, target: Path, attrs: VolumeAttributes) -> None:
        mounted = str(target) in self._mounter.mounts()
        pins = {p.model for p in self._store.pins_of(str(target)) if p.kind == PinKind.MOUNT}
        if mounted and pins == {digest}:
            return  # already published: idempotent
        if mounted:
            raise AlreadyExists(f"{target} already holds another volume ({sorted(pins)})")
        # Pinned first, atomically with eviction: the tree cannot leave between the check
        # and the bind.
        if not self._store.pin_if_ready(digest, PinKind.MOUNT, str(target)):
            raise FetchInProgress(
                f"model {attrs.model} ({digest}) left the cache while being published; retry"
            )
        created = False
        try:
            check = self._checks(digest, attrs.verify == "full")
            self._metrics.verify_bytes.inc(check.bytes_hashed)
            self._metrics.verify_failures.inc(len(check.problems))
            if check.problems:
                self._repairer.damaged(check.problems, repair=attrs.fetch == "IfNotCached")
                first = check.problems[0]
                more = len(check.problems) - 1
                raise ModelCorrupt(
                    f"model {attrs.model} ({digest}) failed its {attrs.verify} check before "
                    f"mounting: {first.path}: {first.reason}"
                    + (f" (and {more} more)" if more else "")
                    + "; the file is quarantined and the model is being repaired"
                )
            created = not target.exists()
            target.mkdir(parents=True, exist_ok=True)
            self._mounter.bind_read_only(self._store.model_path(digest), target)
        except BaseException:
            self._store.unpin(digest, PinKind.MOUNT, str(target))
            if created:
                with contextlib.suppress(OSError):
                    target.rmdir()
            raise

    def _target(self, raw: str) -> Path:
        """The target as the kernel's mount table names it: under the kubelet's directory
        (as configured or resolved), with no symlink below it."""
        if not raw:
            raise InvalidArgument("target_path is required")
        if not raw.startswith("/") or "/../" in f"{raw}/" or "\x00" in raw:
            raise InvalidArgument(f"target_path {raw!r} must be an absolute path without '..'")
        path = Path(os.path.normpath(raw))
        for base in (self._kubelet_dir, self._kubelet_real):
            if path.is_relative_to(base) and path != base:
                rel = path.relative_to(base)
                break
        else:
            raise InvalidArgument(
                f"target_path {raw!r} is not under the kubelet's directory {self._kubelet_dir}"
            )
        current = self._kubelet_real
        for part in rel.parts:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                break
            if stat.S_ISLNK(mode):
                raise InvalidArgument(f"target_path {raw!r} passes through a symlink")
        return self._kubelet_real / rel

    def _is_ours(self, entry: MountEntry) -> bool:
        """A bind mount of one of this store's model trees (its filesystem, a tree's path)."""
        return entry.device == self._store_device and _TREE.search(entry.root) is not None

    # -- unpublish -----------------------------------------------------------------------------

    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: Context
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        target = self._target(request.target_path)
        async with self._serialized(target):
            await _to_thread_to_the_end(self._unpublish, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _unpublish(self, target: Path) -> None:
        entry = self._mounter.mounts().get(str(target))
        if entry is not None:
            if not self._is_ours(entry):
                raise FailedPrecondition(
                    f"{target} holds a mount that is not a weightcache model; left alone"
                )
            self._mounter.unmount(target)
        with contextlib.suppress(FileNotFoundError):
            if target.is_dir() and not os.listdir(target):
                target.rmdir()
        for pin in self._store.pins_of(str(target)):
            if pin.kind == PinKind.MOUNT:
                self._store.unpin(*pin)


async def _to_thread_to_the_end(func: Callable[..., T], *args: Any) -> T:
    """Run ``func`` in a thread and, if the call is cancelled (the kubelet's deadline), still
    wait for the thread before giving up the target's lock: a retry must never mount or unpin
    the same target while the first attempt is still doing so."""
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
