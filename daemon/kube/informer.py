"""List, then watch from the list's resourceVersion, keeping a local copy of one resource.

The loop the API machinery expects of a client: watch with bookmarks so an idle stream still
advances its resourceVersion; when a watch ends (server timeout, dropped connection) open the
next one from the last version seen; on 410 Gone list again, which also catches deletions
missed while disconnected; on any other failure wait (delays as data, interruptible) and retry.
Runs in its own thread; ``on_change`` is called after every change to the copy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from weightcache.daemon.kube.client import Expired, KubeError, Listing
from weightcache.daemon.threads import Spawn, start_guarded

log = logging.getLogger(__name__)
Object = dict[str, Any]
Lister = Callable[[], Listing]
Watcher = Callable[[str, int], Iterator[tuple[str, Object]]]


def object_key(obj: Object) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Informer:
    def __init__(
        self,
        name: str,
        lister: Lister,
        watcher: Watcher,
        on_change: Callable[[], None],
        *,
        stop: threading.Event,
        delays: Sequence[float],
        watch_timeout_s: int,
    ) -> None:
        self.name = name
        self._list = lister
        self._watch = watcher
        self._on_change = on_change
        self._stop = stop
        self._delays = tuple(delays) or (1.0,)
        self._timeout = watch_timeout_s
        self._objects: dict[str, Object] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()
        """Set once the first list has been read."""
        self.lists = 0
        """How many times the resource was listed (1 + one per 410 recovery)."""
        self.resource_version = ""

    def snapshot(self) -> list[Object]:
        with self._lock:
            return list(self._objects.values())

    def start(self, spawn: Spawn = start_guarded) -> threading.Thread:
        return spawn(self.run, f"informer-{self.name}")

    def run(self) -> None:
        failures = 0
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self.relist()
                rv, seen = self._follow(rv)
                if seen:
                    failures = 0
                    continue
                # A watch that ended with nothing at all: back off rather than spin.
                failures += 1
            except Expired as exc:
                log.info("%s: %s; listing again", self.name, exc)
                rv = None
                continue
            except KubeError as exc:
                if self._stop.is_set():
                    return  # the stream ended because we are stopping
                failures += 1
                log.warning("%s: %s", self.name, exc)
            delay = self._delays[min(failures - 1, len(self._delays) - 1)]
            self._stop.wait(delay)

    def relist(self) -> str:
        """List now and replace the local copy; returns the list's resourceVersion."""
        listing = self._list()
        with self._lock:
            self._objects = {object_key(o): o for o in listing.items}
        self.lists += 1
        self.resource_version = listing.resource_version
        self.synced.set()
        self._on_change()
        return listing.resource_version

    def _follow(self, rv: str) -> tuple[str, bool]:
        """One watch; returns the last resourceVersion and whether anything arrived."""
        seen = False
        started = time.monotonic()
        for kind, obj in self._watch(rv, self._timeout):
            seen = True
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
            self.resource_version = rv
            if kind == "BOOKMARK":
                continue
            with self._lock:
                if kind == "DELETED":
                    self._objects.pop(object_key(obj), None)
                else:
                    self._objects[object_key(obj)] = obj
            self._on_change()
            if self._stop.is_set():
                break
        # A stream that stayed open until its timeout was healthy even if the cluster was idle.
        return rv, seen or time.monotonic() - started >= min(self._timeout, 1)
