"""Prometheus metrics. The names are **contract** (prefix ``weightcache_``); more are welcome.

Events on the request path (bytes fetched, fetch and publish durations, failures) are counted
where they happen, through the objects of :class:`Metrics`. State (store bytes and models by
state, capacity, mounts, warm requests, evictions, scrub progress) is read from the components
when Prometheus scrapes, so nothing on the data path keeps a gauge up to date.

``weightcache_store_bytes{state}`` counts each model's size under its state (``ready``,
``fetching``, ``corrupt``, ``failed``) plus the bytes on disk in ``staging`` and ``quarantine``;
models that share files count them each. ``weightcache_store_used_bytes`` is what the budget is
measured against (every blob once, plus staging).

Labels are bounded: states, pin kinds, source schemes and failure reasons, never a file or a
model. The server beside ``/metrics`` answers ``/healthz`` (the process serves), ``/readyz``
(the agent's own readiness, the one the CSI Probe reports) and ``/status`` (the agent's live
view for ``weightcache status``, a JSON document).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from weightcache.daemon import __version__
from weightcache.daemon.config import PACED, ScrubConfig
from weightcache.daemon.errors import WeightcacheError
from weightcache.daemon.signing import SignatureStatus
from weightcache.daemon.store.layout import dir_bytes
from weightcache.daemon.store.states import ModelState, PinKind
from weightcache.daemon.store.store import Store

log = logging.getLogger(__name__)

FETCH_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf"))


class ScrubCounters(Protocol):
    passes: int
    last_pass_seconds: float


Status = Callable[[], Mapping[str, Any]]


class Metrics:
    """One registry per process, holding the counters the request path updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        if GC_COLLECTOR is not None:
            GCCollector(registry=r)
        self.ready: Callable[[], bool] = lambda: True
        """The agent's readiness, read by ``/readyz`` and ``weightcache_ready``."""
        r.register(_AgentCollector(self))
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
        scrub_config: ScrubConfig | None = None,
    ) -> None:
        """Report the state of these components at every scrape."""
        self.registry.register(_StateCollector(store, scrub, warm_requests, scrub_config))

    def serve(
        self,
        address: str,
        *,
        ready: Callable[[], bool] | None = None,
        status: Status | None = None,
    ) -> MetricsServer:
        """Serve ``/metrics``, ``/healthz``, ``/readyz`` (from ``ready``) and, with ``status``,
        ``/status`` on ``HOST:PORT`` (port 0: any free port) from a daemon thread."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise WeightcacheError(f"metrics address {address!r} must be HOST:PORT")
        if ready is not None:
            self.ready = ready
        return MetricsServer(host.strip("[]"), int(port), self, status)


class MetricsServer:
    """The HTTP server of one :class:`Metrics`; ``close`` stops it."""

    def __init__(self, host: str, port: int, metrics: Metrics, status: Status | None) -> None:
        handler = type("Handler", (_Handler,), {"metrics": metrics, "status": status})
        server_class = _Server6 if ":" in host else _Server
        self._httpd = server_class((host, port), handler)
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    status: Status | None
    server_version = f"weightcache/{__version__}"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._answer(200, content_type, encoder(self.metrics.registry))
            elif path == "/healthz":
                self._answer(200, "text/plain; charset=utf-8", b"ok\n")
            elif path == "/readyz":
                ok = self.metrics.ready()
                body = b"ready\n" if ok else b"not ready\n"
                self._answer(200 if ok else 503, "text/plain; charset=utf-8", body)
            elif path == "/status" and self.status is not None:
                body = json.dumps(self.status(), default=str).encode()
                self._answer(200, "application/json", body)
            else:
                self._answer(404, "text/plain; charset=utf-8", b"not found\n")
        except Exception:
            log.exception("serving %s failed", path)
            self._answer(500, "text/plain; charset=utf-8", b"internal error\n")

    def _answer(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)


class _AgentCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "weightcache_build_info", "The running weightcache version", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "weightcache_ready",
            "1 when the agent is ready (store open, CSI socket served), else 0",
            value=1 if self._metrics.ready() else 0,
        )


class _StateCollector(Collector):
    def __init__(
        self,
        store: Store,
        scrub: ScrubCounters | None,
        warm_requests: Callable[[], Mapping[str, int]] | None,
        scrub_config: ScrubConfig | None,
    ) -> None:
        self._store = store
        self._scrub = scrub
        self._scrub_config = scrub_config
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
        bytes_by_state["quarantine"] = dir_bytes(store.layout.quarantine)
        stored = GaugeMetricFamily(
            "weightcache_store_bytes", "Bytes in the store by state", labels=["state"]
        )
        for state in ("ready", "fetching", "corrupt", "failed", "staging", "quarantine"):
            stored.add_metric([state], bytes_by_state[state])
        yield stored
        yield GaugeMetricFamily(
            "weightcache_store_capacity_bytes", "The store's byte budget", value=usage.budget
        )
        yield GaugeMetricFamily(
            "weightcache_store_used_bytes",
            "Bytes measured against the budget: every blob once, plus staging",
            value=usage.used,
        )
        config = store.config
        yield GaugeMetricFamily(
            "weightcache_store_high_watermark_bytes",
            "Usage above which models are evicted",
            value=int(usage.budget * config.high_watermark),
        )
        yield GaugeMetricFamily(
            "weightcache_store_low_watermark_bytes",
            "Usage eviction brings the store down to",
            value=int(usage.budget * config.low_watermark),
        )
        vfs = os.statvfs(store.layout.root)
        yield GaugeMetricFamily(
            "weightcache_store_fs_size_bytes",
            "Size of the filesystem holding the store",
            value=vfs.f_blocks * vfs.f_frsize,
        )
        yield GaugeMetricFamily(
            "weightcache_store_reserve_bytes",
            "Free space the store leaves on its filesystem; fetches never write into it",
            value=usage.reserve,
        )
        yield GaugeMetricFamily(
            "weightcache_store_fs_free_bytes",
            "Space left on the filesystem holding the store (for unprivileged writers)",
            value=usage.fs_free,
        )
        count = GaugeMetricFamily("weightcache_models", "Models by state", labels=["state"])
        for state in ("ready", "fetching", "corrupt", "failed"):
            count.add_metric([state], by_state[state])
        yield count
        signed = GaugeMetricFamily(
            "weightcache_models_signature",
            "Ready models by signature status (unsigned or invalid ones are cached only under a "
            "warn rule)",
            labels=["status"],
        )
        ready = [row for row in models if row.state == ModelState.READY]
        for status in SignatureStatus:
            signed.add_metric([status], sum(1 for row in ready if row.signature == status))
        yield signed
        fetching = [row for row in models if row.state == ModelState.FETCHING]
        yield GaugeMetricFamily(
            "weightcache_fetch_remaining_bytes",
            "Bytes still to fetch of the models being fetched",
            value=sum(max(row.bytes_total - row.bytes_done, 0) for row in fetching),
        )
        pins = store.pins()
        pin_kinds = Tally(kind for _, kind, _ in pins)
        yield GaugeMetricFamily(
            "weightcache_mounts",
            "Read-only mounts of cached models into pods",
            value=pin_kinds[PinKind.MOUNT],
        )
        pinned = GaugeMetricFamily(
            "weightcache_pins", "Pins that keep models from eviction, by kind", labels=["kind"]
        )
        for kind in PinKind:
            pinned.add_metric([kind.value], pin_kinds[kind])
        yield pinned
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
            expected = _expected_pass_seconds(self._scrub_config, scrub, usage.blob_bytes)
            if expected is not None:
                yield GaugeMetricFamily(
                    "weightcache_scrub_expected_pass_seconds",
                    "How long a full scrub pass should take: [scrub] interval_s when paced, the "
                    "bytes held over bytes_per_s at a fixed rate, else the last pass (at least "
                    "an hour)",
                    value=expected,
                )
            oldest = _oldest_verification(store)
            if oldest is not None:
                yield GaugeMetricFamily(
                    "weightcache_scrub_oldest_verified_timestamp_seconds",
                    "Unix time of the least recent check of any blob a ready model uses: every "
                    "byte held has been re-hashed (or fetched) since",
                    value=oldest,
                )


def _expected_pass_seconds(
    config: ScrubConfig | None, scrub: ScrubCounters, held: int
) -> float | None:
    if config is None:
        return None
    if config.bytes_per_s == PACED and config.interval_s > 0:
        return config.interval_s
    if config.bytes_per_s > 0:
        return held / config.bytes_per_s
    return max(scrub.last_pass_seconds, 3600.0)


def _oldest_verification(store: Store) -> float | None:
    order = store.scrub_order()  # least recently verified first
    for sha, _ in order[:8]:
        blob = store.blob_row(sha)
        if blob is not None:
            return min(blob.verified_at, time.time())
    return None
