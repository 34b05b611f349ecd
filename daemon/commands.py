"""The store commands of the CLI: ``warm``, ``ls``, ``verify`` and ``gc``.

Each takes typed arguments, prints human output and progress on stderr, and with ``json_out``
one JSON document on stdout. Exit codes: 0 success, 1 failure or corruption, 2 bad input.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, TextIO

from weightcache.daemon.config import Config
from weightcache.daemon.errors import InvalidReference, WeightcacheError
from weightcache.daemon.fetcher import Progress
from weightcache.daemon.references import ModelRef, parse_reference
from weightcache.daemon.repair import Repairer
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.states import ModelState, Trust
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import verify_store
from weightcache.daemon.wiring import build_fetcher

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressPrinter:
    """A progress bar on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: TextIO, interval_s: float = 5.0) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, p: Progress) -> None:
        with self._lock:
            now = time.monotonic()
            done = p.done >= p.total
            if not self._tty and not done and now - self._last.get(p.digest, 0) < self._interval:
                return
            self._last[p.digest] = now
            pct = 100.0 * p.done / p.total if p.total else 100.0
            eta = f"{p.eta:.0f}s" if p.eta is not None else "?"
            text = (
                f"{p.ref}: {human_bytes(p.done)} / {human_bytes(p.total)} ({pct:.0f}%) "
                f"{human_bytes(p.rate)}/s ETA {eta}"
            )
            if p.last_error:
                text += f" last error: {p.last_error[:120]}"
            if self._tty:
                width = 30
                filled = int(width * pct / 100)
                bar = "#" * filled + "-" * (width - filled)
                self._stream.write(f"\r[{bar}] {text}\x1b[K" + ("\n" if done else ""))
            else:
                self._stream.write(text + "\n")
            self._stream.flush()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _model_json(row: ModelRow, store: Store) -> dict[str, Any]:
    out = asdict(row)
    out["path"] = str(store.model_path(row.digest))
    out["pins"] = [{"kind": k, "holder": h} for _, k, h in store.pins(row.digest)]
    out["eta_s"] = _eta(row)
    return out


def _eta(row: ModelRow) -> float | None:
    """Seconds left of a fetch in progress, from its recorded rate; None when unknown."""
    if row.state != ModelState.FETCHING or row.rate <= 0:
        return None
    return (row.bytes_total - row.bytes_done) / row.rate


def warm(config: Config, refs: list[str], json_out: bool) -> int:
    try:
        parsed: list[ModelRef] = [parse_reference(r, config.registry.aliases) for r in refs]
    except InvalidReference as exc:
        _say(f"weightcache warm: {exc}")
        return EXIT_USAGE
    store = Store(config.store)
    fetcher = build_fetcher(config, store, on_progress=ProgressPrinter(sys.stderr))
    results: list[dict[str, Any]] = []
    failed = False
    try:
        futures = [(ref, time.monotonic(), fetcher.warm_async(ref)) for ref in parsed]
        for ref, started, fut in futures:
            try:
                row = fut.result()
            except WeightcacheError as exc:
                failed = True
                _say(
                    f"weightcache warm: {exc}"
                    if str(ref) in str(exc)
                    else f"weightcache warm: {ref}: {exc}"
                )
                results.append(
                    {
                        "ref": str(ref),
                        "state": "failed",
                        "error": str(exc),
                        "error_kind": type(exc).__name__,
                    }
                )
                continue
            secs = time.monotonic() - started
            _say(
                f"{ref}: ready {row.digest} ({row.files} files, {human_bytes(row.size)}) "
                f"in {secs:.2f}s"
            )
            results.append({"ref": str(ref), "seconds": secs, **_model_json(row, store)})
    finally:
        fetcher.close()
        store.close()
    if json_out:
        print(json.dumps({"models": results}, indent=2))
    return EXIT_FAILED if failed else EXIT_OK


def ls(config: Config, json_out: bool) -> int:
    store = Store(config.store)
    try:
        rows = store.models()
        usage = store.usage()
        if json_out:
            print(
                json.dumps(
                    {
                        "models": [_model_json(r, store) for r in rows],
                        "usage": {
                            "used_bytes": usage.used,
                            "blob_bytes": usage.blob_bytes,
                            "staging_bytes": usage.staging_bytes,
                            "budget_bytes": usage.budget,
                            "fs_free_bytes": usage.fs_free,
                        },
                    },
                    indent=2,
                )
            )
            return EXIT_OK
        _say(
            f"{'DIGEST':19} {'STATE':9} {'SIZE':>10} {'FILES':>6} {'PINS':>4}  "
            "PROGRESS / ERROR  REF"
        )
        for r in rows:
            pins = len(store.pins(r.digest))
            if r.state == ModelState.FETCHING:
                pct = 100.0 * r.bytes_done / r.bytes_total if r.bytes_total else 0.0
                eta = _eta(r)
                detail = (
                    f"{human_bytes(r.bytes_done)}/{human_bytes(r.bytes_total)} {pct:.0f}% "
                    f"{human_bytes(r.rate)}/s ETA {f'{eta:.0f}s' if eta else '?'}"
                )
                if r.error:
                    detail += f" last error: {r.error[:80]}"
            else:
                detail = r.error[:80] if r.error else "-"
            if r.trust == Trust.FIRST_FETCH:
                # No digest from the source checked these bytes (an S3 object without one).
                detail = (
                    f"{detail} (trusted on first fetch)" if r.error else "trusted on first fetch"
                )
            size = r.size or r.bytes_total
            _say(
                f"{r.digest[:19]} {r.state:9} {human_bytes(size):>10} {r.files:>6} {pins:>4}  "
                f"{detail}  {r.ref}"
            )
        _say(
            f"used {human_bytes(usage.used)} of {human_bytes(usage.budget)} budget, "
            f"{human_bytes(usage.fs_free)} free on disk"
        )
        return EXIT_OK
    finally:
        store.close()


def verify(config: Config, full: bool, json_out: bool) -> int:
    store = Store(config.store)
    try:
        started = time.monotonic()
        repairer = Repairer(store, None)  # quarantined and marked; the node agent repairs
        report = verify_store(
            store, full=full, damaged=lambda problems: repairer.damaged(problems, repair=False)
        )
        secs = time.monotonic() - started
    finally:
        store.close()
    for p in report.problems:
        _say(f"CORRUPT {p.model[:19]} {p.path}: {p.reason} (quarantined)")
    _say(
        f"verify ({report.mode}): {report.models} models, {report.files} files, "
        f"{human_bytes(report.bytes_hashed)} hashed in {secs:.2f}s: "
        f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}"
    )
    if json_out:
        print(
            json.dumps(
                {
                    "mode": report.mode,
                    "ok": report.ok,
                    "models": report.models,
                    "files": report.files,
                    "bytes_hashed": report.bytes_hashed,
                    "seconds": secs,
                    "problems": [asdict(p) for p in report.problems],
                    "corrupt_models": report.corrupt_models,
                },
                indent=2,
            )
        )
    return EXIT_OK if report.ok else EXIT_FAILED


def gc(config: Config, target_bytes: int | None) -> int:
    store = Store(config.store)
    try:
        evicted = store.gc(target_bytes)
        usage = store.usage()
    finally:
        store.close()
    for d in evicted:
        _say(f"evicted {d}")
    _say(f"gc: evicted {len(evicted)} model(s); {human_bytes(usage.used)} in use")
    return EXIT_OK
