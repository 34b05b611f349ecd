"""The store commands of the CLI: ``warm``, ``ls``, ``verify`` and ``gc``, and ``label``.

Each takes typed arguments. Tables and results go to stdout (``weightcache ls | grep`` works),
progress, logs and errors to stderr; with ``json_out`` stdout holds one JSON document and
nothing else. ``ls``, ``verify`` and ``gc`` open only a store that exists: they never create
one. Exit codes: 0 success, 1 failure or corruption, 2 bad input.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, TextIO

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.config import Config
from weightcache.daemon.errors import InvalidReference, WeightcacheError
from weightcache.daemon.fetcher import Fetcher, Progress
from weightcache.daemon.kube.naming import LABEL_VALUE, label_key
from weightcache.daemon.references import ModelRef, parse_reference
from weightcache.daemon.repair import Repairer
from weightcache.daemon.signing import SignatureStatus
from weightcache.daemon.store.index import ModelRow
from weightcache.daemon.store.states import ModelState, Trust
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import verify_store
from weightcache.daemon.units import human_bytes

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class NoStore(WeightcacheError):
    """The store directory holds no store (nothing was ever fetched there)."""


class ProgressPrinter:
    """On a terminal, one line per model, redrawn in place; otherwise a plain line per model
    every few seconds."""

    def __init__(self, stream: TextIO, interval_s: float = 5.0) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._lines: dict[str, str] = {}  # model -> its line, in the order first seen
        self._drawn = 0  # lines of the block on the terminal, the cursor just below them
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
                self._lines[p.digest] = f"[{bar}] {text}"
                self._stream.write(self._up() + self._block())
            else:
                self._stream.write(text + "\n")
            self._stream.flush()

    def _up(self) -> str:
        return f"\x1b[{self._drawn}A\r" if self._drawn else "\r"

    def _block(self) -> str:
        self._drawn = len(self._lines)
        return "".join(f"{line}\x1b[K\n" for line in self._lines.values())

    def print_above(self, text: str, out: TextIO) -> None:
        """Print a line to ``out`` above the progress lines, which are drawn again below it
        (on a terminal; elsewhere it is a plain print)."""
        with self._lock:
            if not self._tty or not self._drawn:
                print(text, file=out, flush=True)
                return
            self._stream.write(self._up() + "\x1b[J")
            self._stream.flush()
            print(text, file=out, flush=True)
            self._stream.write(self._block())
            self._stream.flush()

    @contextlib.contextmanager
    def logs_above(self) -> Iterator[None]:
        """While inside, log records written to this terminal land above the progress lines."""
        printer = self

        class Above(io.TextIOBase):
            def write(self, text: str) -> int:
                printer.print_above(text.rstrip("\n"), printer._stream)
                return len(text)

        moved = []
        if self._tty:
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is self._stream:
                    moved.append(handler)
                    handler.setStream(Above())
        try:
            yield
        finally:
            for handler in moved:
                handler.setStream(self._stream)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _result(text: str, json_out: bool) -> None:
    """A line of the command's result: stdout, unless stdout holds the JSON document."""
    print(text, file=sys.stderr if json_out else sys.stdout, flush=True)


def _existing_store(config: Config) -> Store:
    """Open the store only if one exists at ``[store] root``: never create one."""
    root = config.store.root
    if not (root / "index.sqlite3").is_file():
        raise NoStore(
            f"no store at {root} (nothing was fetched on this node yet, or --store / "
            "[store] root names another directory)"
        )
    return Store(config.store)


def _model_json(row: ModelRow, store: Store) -> dict[str, Any]:
    out = asdict(row)
    out["path"] = str(store.model_path(row.digest))
    out["pins"] = [{"kind": k, "holder": h} for _, k, h in store.pins(row.digest)]
    out["eta_s"] = _eta(row)
    return out


def signature_mark(row: ModelRow) -> str:
    """What ``ls`` and ``status`` say of a model a signing rule did not verify ('' otherwise)."""
    if row.signature not in (SignatureStatus.UNSIGNED, SignatureStatus.INVALID):
        return ""
    return f"signature {row.signature}" + (
        f": {row.signature_detail[:80]}" if row.signature_detail else ""
    )


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
    progress = ProgressPrinter(sys.stderr)
    fetcher = build_fetcher(config, store, on_progress=progress)
    results: list[dict[str, Any]] = []
    try:
        with progress.logs_above():
            try:
                _warm_all(fetcher, store, parsed, progress, json_out, results)
            finally:
                fetcher.close()
    finally:
        store.close()
    if json_out:
        print(json.dumps({"models": results}, indent=2))
    return EXIT_FAILED if any(r.get("state") == "failed" for r in results) else EXIT_OK


def _warm_all(
    fetcher: Fetcher,
    store: Store,
    parsed: list[ModelRef],
    progress: ProgressPrinter,
    json_out: bool,
    results: list[dict[str, Any]],
) -> None:
    out = sys.stderr if json_out else sys.stdout
    futures = [(ref, time.monotonic(), fetcher.warm_async(ref)) for ref in parsed]
    for ref, started, fut in futures:
        try:
            row = fut.result()
        except WeightcacheError as exc:
            progress.print_above(
                f"weightcache warm: {exc}"
                if str(ref) in str(exc)
                else f"weightcache warm: {ref}: {exc}",
                sys.stderr,
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
        progress.print_above(
            f"{ref}: ready {row.digest} ({row.files} files, {human_bytes(row.size)}) "
            f"in {secs:.2f}s",
            out,
        )
        results.append({"ref": str(ref), "seconds": secs, **_model_json(row, store)})


def ls(config: Config, json_out: bool) -> int:
    store = _existing_store(config)
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
                            "reserve_bytes": usage.reserve,
                        },
                    },
                    indent=2,
                )
            )
            return EXIT_OK
        _result(
            f"{'DIGEST':19} {'STATE':9} {'SIZE':>10} {'FILES':>6} {'PINS':>4}  "
            "PROGRESS / ERROR  REF",
            json_out,
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
            mark = signature_mark(r)
            if mark:
                detail = mark if detail == "-" else f"{detail} ({mark})"
            size = r.size or r.bytes_total
            _result(
                f"{r.digest[:19]} {r.state:9} {human_bytes(size):>10} {r.files:>6} {pins:>4}  "
                f"{detail}  {r.ref}",
                json_out,
            )
        _result(
            f"used {human_bytes(usage.used)} of {human_bytes(usage.budget)} budget, "
            f"{human_bytes(usage.fs_free)} free on disk ({human_bytes(usage.reserve)} kept free)",
            json_out,
        )
        return EXIT_OK
    finally:
        store.close()


def verify(config: Config, full: bool, json_out: bool) -> int:
    store = _existing_store(config)
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
        _result(f"CORRUPT {p.model[:19]} {p.path}: {p.reason} (quarantined)", json_out)
    _result(
        f"verify ({report.mode}): {report.models} models, {report.files} files, "
        f"{human_bytes(report.bytes_hashed)} hashed in {secs:.2f}s: "
        f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}",
        json_out,
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
    store = _existing_store(config)
    try:
        evicted = store.gc(target_bytes)
        usage = store.usage()
    finally:
        store.close()
    for d in evicted:
        _result(f"evicted {d}", False)
    _result(f"gc: evicted {len(evicted)} model(s); {human_bytes(usage.used)} in use", False)
    return EXIT_OK


def label(config: Config, refs: list[str], json_out: bool) -> int:
    """The node label each reference's warm sets, and the preferred node affinity that steers
    a workload's pods to nodes holding it (to paste under ``spec.template.spec``)."""
    try:
        parsed = [parse_reference(r, config.registry.aliases) for r in refs]
    except InvalidReference as exc:
        _say(f"weightcache label: {exc}")
        return EXIT_USAGE
    keys = [(str(ref), label_key(ref)) for ref in parsed]
    terms = [
        {"weight": 100, "preference": {"matchExpressions": [{"key": k, "operator": "Exists"}]}}
        for _, k in keys
    ]
    affinity = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": terms}}
    if json_out:
        print(
            json.dumps(
                {"labels": [{"ref": r, "label": k} for r, k in keys], "affinity": affinity},
                indent=2,
            )
        )
        return EXIT_OK
    for ref, key in keys:
        print(f"# {ref}: nodes holding it carry the label {key}={LABEL_VALUE}")
    print("affinity:")
    print("  nodeAffinity:")
    print("    preferredDuringSchedulingIgnoredDuringExecution:")
    for _, key in keys:
        print("      - weight: 100")
        print("        preference:")
        print("          matchExpressions:")
        print(f"            - key: {key}")
        print("              operator: Exists")
    return EXIT_OK
