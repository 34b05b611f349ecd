"""``weightcache status``: the node's whole picture for an operator on call.

Two halves, one document:

- the **store**, read without changing it: use against the budget, the watermarks and the
  filesystem's free space, models by state with fetch progress, pins by kind, how long ago the
  least recently verified byte was checked, and the last re-check failures;
- the **agent** (``weightcache node``), asked over HTTP on its metrics address (``/status``):
  readiness, the scrubber's passes, the warm requests by state and its recent warnings and
  errors. When no agent answers, the document says so and the store half still stands.

A store directory that does not exist (or holds no index) is reported and nothing is created.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from weightcache.app.logs import RecentErrors
from weightcache.daemon import __version__
from weightcache.daemon.config import StoreConfig
from weightcache.daemon.errors import WeightcacheError
from weightcache.daemon.signing import SignatureStatus
from weightcache.daemon.store.index import Index, ModelRow
from weightcache.daemon.store.layout import Layout, dir_bytes
from weightcache.daemon.store.states import ModelState, PinKind
from weightcache.daemon.store.store import measure_usage
from weightcache.daemon.units import human_bytes

EXIT_OK, EXIT_FAILED = 0, 1
AGENT_TIMEOUT_S = 3.0
FAILURES_SHOWN = 10
ERRORS_SHOWN = 10


class NoStore(WeightcacheError):
    """The store directory does not exist or holds no index."""


# -- the agent's half, served at /status ---------------------------------------------------------


class ScrubView(Protocol):
    passes: int
    last_pass_seconds: float
    last_pass_files: int
    bytes_verified: int
    failures: int


class WarmView(Protocol):
    last_error: str

    def request_states(self) -> Mapping[str, int]: ...


@dataclass
class AgentView:
    """What the running agent knows that the store does not: served as ``/status``."""

    node: str
    ready: Callable[[], bool]
    recent: RecentErrors
    scrub: ScrubView | None = None
    warm: WarmView | None = None
    started_at: float = field(default_factory=time.time)

    def report(self) -> dict[str, Any]:
        scrub, warm = self.scrub, self.warm
        return {
            "node": self.node,
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "ready": self.ready(),
            "scrub": None
            if scrub is None
            else {
                "passes": scrub.passes,
                "last_pass_seconds": scrub.last_pass_seconds,
                "last_pass_files": scrub.last_pass_files,
                "bytes_verified": scrub.bytes_verified,
                "failures": scrub.failures,
            },
            "warm": None
            if warm is None
            else {"requests": dict(warm.request_states()), "last_error": warm.last_error},
            "recent_errors": self.recent.snapshot(),
        }


def ask_agent(address: str, timeout: float = AGENT_TIMEOUT_S) -> dict[str, Any] | str:
    """The agent's ``/status`` at ``HOST:PORT``, or why it could not be had."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"no agent answered at {url}: {getattr(exc, 'reason', exc)}"
    if not isinstance(doc, dict):
        return f"{url} answered something other than a status document"
    return doc


# -- the store's half, read only -----------------------------------------------------------------


def read_store(config: StoreConfig, now: float | None = None) -> dict[str, Any]:
    """The store at ``config.root`` as a document; raises :class:`NoStore` rather than create
    anything."""
    layout = Layout(config.root)
    if not layout.root.is_dir():
        raise NoStore(f"no store at {layout.root}: the directory does not exist")
    if not layout.index.is_file():
        raise NoStore(f"no store at {layout.root}: it holds no {layout.index.name}")
    now = time.time() if now is None else now
    index = Index(layout.index)
    try:
        return _store_doc(config, layout, index, now)
    finally:
        index.close()


def _store_doc(config: StoreConfig, layout: Layout, index: Index, now: float) -> dict[str, Any]:
    models = index.models()
    pins = index.pins()
    pins_by_model = Counter(model for model, _, _ in pins)
    usage = measure_usage(config, layout, index)
    blob_bytes, staging = usage.blob_bytes, usage.staging_bytes
    budget, reserve, used = usage.budget, usage.reserve, usage.used
    vfs = os.statvfs(layout.root)
    fs_size = vfs.f_blocks * vfs.f_frsize
    oldest = index.oldest_verification()
    failures = [
        {"sha256": sha, "at": at, "mode": mode, "detail": detail}
        for sha, at, mode, detail in index.recent_failures(FAILURES_SHOWN)
    ]
    by_state = Counter(row.state for row in models)
    return {
        "root": str(layout.root),
        "usage": {
            "used_bytes": used,
            "blob_bytes": blob_bytes,
            "staging_bytes": staging,
            "quarantine_bytes": dir_bytes(layout.root / "quarantine"),
            "budget_bytes": budget,
            "high_watermark_bytes": int(budget * config.high_watermark),
            "low_watermark_bytes": int(budget * config.low_watermark),
            "reserve_bytes": reserve,
            "fs_size_bytes": fs_size,
            "fs_free_bytes": vfs.f_bavail * vfs.f_frsize,
        },
        "models_by_state": {state.value: by_state[state] for state in ModelState},
        "models": [_model_doc(row, pins_by_model[row.digest]) for row in models],
        "pins_by_kind": {kind.value: sum(1 for _, k, _ in pins if k == kind) for kind in PinKind},
        "scrub": {
            "oldest_verified_at": oldest or None,
            "oldest_verified_age_s": max(now - oldest, 0.0) if oldest else None,
            "recent_failures": failures,
        },
    }


def _model_doc(row: ModelRow, pins: int) -> dict[str, Any]:
    size = row.size or row.bytes_total
    doc: dict[str, Any] = {
        "digest": row.digest,
        "ref": row.ref,
        "state": row.state,
        "size_bytes": size,
        "files": row.files,
        "pins": pins,
        "last_used": row.last_used,
        "error": row.error,
        "signature": {
            "status": row.signature,
            "scheme": row.signature_scheme,
            "signer": row.signature_signer,
            "detail": row.signature_detail,
        },
    }
    if row.state == ModelState.FETCHING:
        doc["progress"] = {
            "bytes_done": row.bytes_done,
            "bytes_total": row.bytes_total,
            "rate_bytes_per_s": row.rate,
            "eta_s": (row.bytes_total - row.bytes_done) / row.rate if row.rate > 0 else None,
        }
    return doc


# -- the command ---------------------------------------------------------------------------------


def status(config: StoreConfig, agent_address: str | None, json_out: bool) -> int:
    """Print the node's status: a table on stdout, or with ``json_out`` one JSON document.
    Exit 1 when there is no store, anything is corrupt or failed, or the agent is not ready."""
    try:
        store = read_store(config)
    except NoStore as exc:
        if json_out:
            print(json.dumps({"store": None, "error": str(exc)}, indent=2))
        print(f"weightcache status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    agent = ask_agent(agent_address) if agent_address else "not asked"
    doc: dict[str, Any] = {
        "store": store,
        "agent": agent if isinstance(agent, dict) else None,
        "agent_error": agent if isinstance(agent, str) else None,
    }
    doc["healthy"] = healthy(doc)
    if json_out:
        print(json.dumps(doc, indent=2))
    else:
        print(render(doc), end="")
    return EXIT_OK if doc["healthy"] else EXIT_FAILED


def healthy(doc: Mapping[str, Any]) -> bool:
    """No corrupt or failed model, and an agent that answered is ready."""
    store = doc["store"]
    bad = store["models_by_state"][ModelState.CORRUPT] + store["models_by_state"][ModelState.FAILED]
    agent = doc.get("agent")
    return bad == 0 and (agent is None or bool(agent.get("ready")))


def render(doc: Mapping[str, Any], now: float | None = None) -> str:
    """The document as an operator reads it."""
    now = time.time() if now is None else now
    store, agent = doc["store"], doc.get("agent")
    u = store["usage"]
    budget = u["budget_bytes"] or 1
    lines = [f"store {store['root']}"]
    lines.append(
        f"  used      {human_bytes(u['used_bytes'])} of {human_bytes(u['budget_bytes'])} budget "
        f"({100 * u['used_bytes'] / budget:.0f}%), high watermark "
        f"{human_bytes(u['high_watermark_bytes'])}, low {human_bytes(u['low_watermark_bytes'])}"
    )
    lines.append(
        f"  disk      {human_bytes(u['fs_free_bytes'])} free of {human_bytes(u['fs_size_bytes'])}, "
        f"reserve {human_bytes(u['reserve_bytes'])}"
        + (" (INTO THE RESERVE)" if u["fs_free_bytes"] < u["reserve_bytes"] else "")
        + "; "
        + f"staging {human_bytes(u['staging_bytes'])}, "
        + f"quarantine {human_bytes(u['quarantine_bytes'])}"
    )
    states = ", ".join(f"{n} {s}" for s, n in store["models_by_state"].items())
    pins = ", ".join(f"{n} {k}" for k, n in store["pins_by_kind"].items())
    lines.append(f"  models    {states}")
    lines.append(f"  pins      {pins}")
    for m in store["models"]:
        detail = ""
        if "progress" in m:
            p = m["progress"]
            pct = 100 * p["bytes_done"] / p["bytes_total"] if p["bytes_total"] else 0.0
            eta = f"{p['eta_s']:.0f}s" if p["eta_s"] is not None else "?"
            detail = (
                f" {human_bytes(p['bytes_done'])}/{human_bytes(p['bytes_total'])} {pct:.0f}% "
                f"{human_bytes(p['rate_bytes_per_s'])}/s ETA {eta}"
            )
        if m["error"]:
            detail += f" error: {m['error'][:100]}"
        sig = m.get("signature") or {}
        if sig.get("status") in (SignatureStatus.UNSIGNED, SignatureStatus.INVALID):
            detail += f" signature {sig['status']}" + (
                f": {sig['detail'][:80]}" if sig.get("detail") else ""
            )
        lines.append(
            f"    {m['digest'][:19]} {m['state']:8} {human_bytes(m['size_bytes']):>10} "
            f"pins {m['pins']}  {m['ref']}{detail}"
        )
    scrub = store["scrub"]
    age = scrub["oldest_verified_age_s"]
    lines.append(
        "  verified  every byte held re-checked within the last "
        + (_duration(age) if age is not None else "- (nothing held)")
    )
    for f in scrub["recent_failures"]:
        lines.append(f"    {_ago(now, f['at'])} {f['mode']}: {f['detail'][:120]}")
    if agent is None:
        lines.append(f"agent     {doc.get('agent_error') or 'not asked'}")
    else:
        lines.append(
            f"agent     node {agent['node']}, {'ready' if agent['ready'] else 'NOT READY'}, "
            f"version {agent['version']}, up {_duration(now - agent['started_at'])}"
        )
        s = agent.get("scrub")
        if s is None:
            lines.append("  scrub     disabled")
        else:
            lines.append(
                f"  scrub     {s['passes']} complete pass(es), last {s['last_pass_files']} files "
                f"in {_duration(s['last_pass_seconds'])}; "
                f"{human_bytes(s['bytes_verified'])} verified, "
                f"{s['failures']} finding(s) since start"
            )
        w = agent.get("warm")
        if w is None:
            lines.append("  warm      no warm controller (--no-kube)")
        else:
            requests = ", ".join(f"{n} {s}" for s, n in sorted(w["requests"].items())) or "none"
            lines.append(f"  warm      requests: {requests}")
            if w.get("last_error"):
                lines.append(f"            last error: {w['last_error'][:120]}")
        errors = agent.get("recent_errors") or []
        lines.append(f"  errors    {len(errors)} recent warning(s) and error(s)")
        for e in errors[-ERRORS_SHOWN:]:
            lines.append(f"    {e['time']} {e['level']} {e['logger']}: {e['message'][:160]}")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _ago(now: float, at: float) -> str:
    return f"{_duration(now - at)} ago"
