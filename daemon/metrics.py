"""Prometheus metrics. The names are **contract** (prefix ``weightcache_``); more are welcome.

Events on the request path (bytes fetched, fetch and publish durations, failures) are counted
where they happen, through the objects of :class:`Metrics`. State (store bytes and models by
state, capacity, mounts, warm requests, evictions, scrub progress) is read from the components
when Prometheus scrapes, so nothing on the data path keeps a gauge up to date.

``weightcache_store_bytes{state}`` counts each model's size under its state (``ready``,
``fetching``, ``corrupt``, ``failed``) plus the bytes on disk in ``staging`` and ``quarantine``;
models that share files count them each.
"""

from __future__ import annotations

import os
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from weightcache.daemon.errors import WeightcacheError
from weightcache.daemon.store.store import Store

FETCH_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf"))


class ScrubCounters(Protocol):
    passes: int
    last_pass_seconds: float


class Metrics:
    """One registry per process, holding the counters the request path updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.fetch_bytes = Counter(
            "weightcache_fetch_bytes", "Bytes read from sources", ["source"], registry=r
        )
        self.fetch_duration = Histogram(
            "weightcache_fetch_duration_seconds",
            "Time to fetch one model, resolve to ready",
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.fetch_failures = Counter(
            "weightcache_fetch_failures",
            "Model fetches that failed, by reason",
            ["reason"],
            registry=r,
        )
        self.repair_bytes = Counter(
            "weightcache_repair_bytes",
            "Bytes fetched to repair damaged files by range (the rest of each file was kept)",
            registry=r,
        )
        self.publish_duration = Histogram(
            "weightcache_publish_duration_seconds",
            "NodePublishVolume latency",
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self.publish = Counter(
            "weightcache_publish",
            "NodePublishVolume calls: hit (mounted from the cache), miss (not ready: fetch "
            "started or joined), error",
            ["result"],
            registry=r,
        )
        self.verify_bytes = Counter(
            "weightcache_verify_bytes",
            "Bytes re-hashed (the scrubber, and full checks at publish)",
            registry=r,
        )
        self.verify_failures = Counter(
            "weightcache_verify_failures",
            "Files that failed a re-check (scrubber or publish)",
            registry=r,
        )

    def watch(
        self,
        store: Store,
        *,
        scrub: ScrubCounters | None = None,
        warm_requests: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        """Report the state of these components at every scrape."""
        self.registry.register(_StateCollector(store, scrub, warm_requests))

    def serve(self, address: str) -> None:
        """Serve ``/metrics`` on ``HOST:PORT`` from a daemon thread."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise WeightcacheError(f"metrics address {address!r} must be HOST:PORT")
        start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)


class _StateCollector(Collector):
    def __init__(
        self,
        store: Store,
        scrub: ScrubCounters | None,
        warm_requests: Callable[[], Mapping[str, int]] | None,
    ) -> None:
        self._store = store
        self._scrub = scrub
        self._warm = warm_requests
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect()

    def _collect(self) -> Iterator[Metric]:
        store = self._store
        models = store.models()
        by_state: Tally[str] = Tally()
        bytes_by_state: Tally[str] = Tally()
        for row in models:
            by_state[row.state] += 1
            bytes_by_state[row.state] += row.size or row.bytes_total
        usage = store.usage()
        bytes_by_state["staging"] = usage.staging_bytes
        bytes_by_state["quarantine"] = _dir_bytes(store.layout.quarantine)
        stored = GaugeMetricFamily(
            "weightcache_store_bytes", "Bytes in the store by state", labels=["state"]
        )
        for state in ("ready", "fetching", "corrupt", "failed", "staging", "quarantine"):
            stored.add_metric([state], bytes_by_state[state])
        yield stored
        yield GaugeMetricFamily(
            "weightcache_store_capacity_bytes", "The store's byte budget", value=usage.budget
        )
        count = GaugeMetricFamily("weightcache_models", "Models by state", labels=["state"])
        for state in ("ready", "fetching", "corrupt", "failed"):
            count.add_metric([state], by_state[state])
        yield count
        pins = store.pins()
        yield GaugeMetricFamily(
            "weightcache_mounts",
            "Read-only mounts of cached models into pods",
            value=sum(1 for _, kind, _ in pins if kind == "mount"),
        )
        yield CounterMetricFamily(
            "weightcache_evictions", "Models evicted to make room", value=store.evictions
        )
        if self._warm is not None:
            warm = GaugeMetricFamily(
                "weightcache_warm_requests",
                "Models wanted warm on this node by workloads, by state",
                labels=["state"],
            )
            states = self._warm()
            for state in ("ready", "fetching", "failed"):
                warm.add_metric([state], states.get(state, 0))
            yield warm
        scrub = self._scrub
        if scrub is not None:
            yield CounterMetricFamily(
                "weightcache_scrub_passes",
                "Complete scrub passes over the store",
                value=scrub.passes,
            )
            yield GaugeMetricFamily(
                "weightcache_scrub_pass_seconds",
                "Duration of the last complete scrub pass",
                value=scrub.last_pass_seconds,
            )


def _dir_bytes(path: os.PathLike[str] | str) -> int:
    total = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            continue
    return total
