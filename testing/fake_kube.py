"""A fake Kubernetes API server speaking the real HTTP list/watch protocol, for node-agent tests.

The official ``kubernetes`` client talks to it on 127.0.0.1 exactly as it talks to an apiserver,
so ``daemon/kube/client.py`` runs unpatched. It serves what that client calls, and only that:

- ``GET /apis/apps/v1/{deployments,statefulsets}``: lists in all namespaces, paged by ``limit``
  and ``continue`` (later pages are a snapshot at the first page's revision), and watches;
- ``GET /api/v1/nodes`` (``fieldSelector=metadata.name=N``) to watch one node, ``GET`` and
  ``PATCH /api/v1/nodes/N``; the patch is a strategic merge patch, which is what the client
  sends for a dict body (lists are replaced whole: nothing here has merge keys);
- ``POST /api/v1/namespaces/NS/events``.

Lists carry the global resourceVersion; watches start from a resourceVersion, are chunked
streams of one JSON event per line replayed from a retained change log, with bookmarks when
allowed; errors are ``Status`` objects; one bearer token authenticates. Anything else (another
path, verb or query parameter) is refused with a Status, so a new call in the client fails
loudly here rather than being half served. Faults that are rare in a real cluster but decide
whether a controller is correct happen when a test asks: a dropped stream, compaction into
410 Gone, a bookmark, an error status. This module must not import the client: the fake is only
a fake if nothing is shared.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import enum
import json
import queue
import re
import secrets
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from weightcache.testing.kube_objects import JSON, deployment, node, statefulset

__all__ = ["FakeKube", "Request", "deployment", "node", "run_fake_kube", "statefulset"]

STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass(frozen=True)
class _Kind:
    kind: str
    api_version: str
    plural: str
    namespaced: bool

    @property
    def resource(self) -> str:
        """The qualified resource name error messages use: ``deployments.apps``, ``nodes``."""
        group = self.api_version.rpartition("/")[0]
        return f"{self.plural}.{group}" if group else self.plural


_KINDS = {
    k.kind: k
    for k in (
        _Kind("Deployment", "apps/v1", "deployments", True),
        _Kind("StatefulSet", "apps/v1", "statefulsets", True),
        _Kind("Node", "v1", "nodes", False),
        _Kind("Event", "v1", "events", True),
    )
}
# The routes the client uses: (method, path pattern, kind, handler name).
_ROUTES = (
    ("GET", re.compile(r"/apis/apps/v1/deployments"), "Deployment", "collection"),
    ("GET", re.compile(r"/apis/apps/v1/statefulsets"), "StatefulSet", "collection"),
    ("GET", re.compile(r"/api/v1/nodes"), "Node", "collection"),
    ("GET", re.compile(r"/api/v1/nodes/(?P<name>[^/]+)"), "Node", "read"),
    ("PATCH", re.compile(r"/api/v1/nodes/(?P<name>[^/]+)"), "Node", "patch"),
    ("POST", re.compile(r"/api/v1/namespaces/(?P<ns>[^/]+)/events"), "Event", "create"),
)
_LIST_PARAMS = {"limit", "continue", "fieldSelector"}
_WATCH_PARAMS = {
    "watch",
    "resourceVersion",
    "allowWatchBookmarks",
    "timeoutSeconds",
    "fieldSelector",
}


def _kind(name: str) -> _Kind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unsupported kind {name!r}; one of {sorted(_KINDS)}") from None


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, str]
    status: int


class _ApiError(Exception):
    """Answered as a ``Status`` object; raised anywhere while serving a request."""

    def __init__(self, code: int, message: str, *, reason: str = "", details: JSON | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> JSON:
        """A failure ``Status`` as the apiserver writes it (also the object of a watch ERROR)."""
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body


def _not_found(kind: _Kind, name: str) -> _ApiError:
    return _ApiError(
        404, f'{kind.resource} "{name}" not found', details={"name": name, "kind": kind.plural}
    )


def _too_old(requested: int, oldest: int) -> _ApiError:
    return _ApiError(410, f"too old resource version: {requested} ({oldest})", reason="Expired")


def _merge(target: Any, patch: Any) -> Any:
    """A merge patch on maps (RFC 7386: null deletes a key; anything but an object replaces),
    which is what a strategic merge patch is for types without merge keys."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


# --- watches -----------------------------------------------------------------------------------


class _Stop(enum.Enum):
    END = "end"
    """Write the terminating chunk: the stream ends cleanly."""
    DROP = "drop"
    """The socket is already shut down: leave without another byte."""


@dataclass(frozen=True)
class _Change:
    revision: int
    kind: str
    type: str
    obj: JSON
    """For DELETED, the last state with the deletion's resourceVersion."""
    prev: JSON | None


def _event_line(type_: str, obj: JSON) -> bytes:
    return json.dumps({"type": type_, "object": obj}, separators=(",", ":")).encode() + b"\n"


@dataclass(eq=False)
class _Watcher:
    """One open watch stream. Everything is queued under the server lock, so a stream sees
    changes in revision order and a bookmark never overtakes an event it covers."""

    kind: _Kind
    name: str | None
    """The ``metadata.name`` of the field selector, if any (a name never changes, so an object
    never enters or leaves the selection)."""
    bookmarks: bool
    conn: socket.socket
    items: queue.SimpleQueue[bytes | _Stop] = field(default_factory=queue.SimpleQueue)
    wake: tuple[socket.socket, socket.socket] = field(default_factory=socket.socketpair)

    def __post_init__(self) -> None:
        self.wake[1].setblocking(False)

    def put(self, item: bytes | _Stop) -> None:
        self.items.put(item)
        # A full wake buffer means a wake-up is already pending.
        with contextlib.suppress(OSError):
            self.wake[1].send(b"\0")

    def offer(self, change: _Change) -> None:
        if change.kind == self.kind.kind and self.name in (None, change.obj["metadata"]["name"]):
            self.put(_event_line(change.type, change.obj))

    def bookmark(self, revision: int) -> None:
        obj = {
            "kind": self.kind.kind,
            "apiVersion": self.kind.api_version,
            "metadata": {"resourceVersion": str(revision)},
        }
        self.put(_event_line("BOOKMARK", obj))

    def expire(self, requested: int, oldest: int) -> None:
        self.put(_event_line("ERROR", _too_old(requested, oldest).status()))
        self.put(_Stop.END)

    def close(self) -> None:
        for sock in self.wake:
            sock.close()


@dataclass
class _Injection:
    prefix: str
    status: int
    remaining: int


def _key(obj: JSON) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace") or "", meta["name"])


def _sort_key(obj: JSON) -> tuple[str, str]:
    return (obj["metadata"].get("namespace") or "", obj["metadata"]["name"])


def _parse_bool(query: dict[str, str], name: str) -> bool:
    value = query.get(name, "")
    if value in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if value in ("", "0", "f", "F", "false", "FALSE", "False"):
        return False
    raise _ApiError(400, f"invalid boolean {name}={value!r}")


def _parse_int(query: dict[str, str], name: str) -> int:
    value = query.get(name, "")
    if not value.isdigit():
        raise _ApiError(400, f"invalid {name} {value!r}")
    return int(value)


def _without_type(obj: JSON) -> JSON:
    """List items carry no kind/apiVersion, as the apiserver writes them (watch objects do)."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _continue_token(revision: int, start: tuple[str, str]) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": "/".join(start) + "\0"})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _parse_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token.encode()))
        ns, _, name = raw["start"].rstrip("\0").partition("/")
        return int(raw["rv"]), (ns, name)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _ApiError(400, "continue key is not valid") from None


# --- the server state --------------------------------------------------------------------------


class FakeKube:
    """The handle of a running fake apiserver: state, logs and fault injection, thread-safe.

    Kinds are ``"Deployment"``, ``"StatefulSet"``, ``"Node"`` and ``"Event"``; cluster-scoped
    objects (Nodes) use ``namespace=""`` (or None). Objects are plain API JSON (camelCase dicts).
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.host = ""
        """``127.0.0.1:PORT`` once serving."""
        self._cond = threading.Condition(threading.RLock())
        self._objects: dict[tuple[str, str, str], JSON] = {}
        self._revision = 1
        self._compacted = 1
        """Changes at or before this revision are forgotten (the etcd compaction point)."""
        self._log: list[_Change] = []
        self._watchers: list[_Watcher] = []
        self._requests: list[Request] = []
        self._injections: list[_Injection] = []
        self._connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def revision(self) -> int:
        """The current global resourceVersion (shared by every kind, like etcd's revision)."""
        with self._cond:
            return self._revision

    def kubeconfig(self, path: Path) -> Path:
        """Write a kubeconfig for this server (to ``path``, or ``path/kubeconfig`` if ``path``
        is a directory) for ``kubernetes.config.new_client_from_config``. JSON is YAML, so no
        YAML writer is needed."""
        if path.is_dir():
            path = path / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    # --- state API -------------------------------------------------------------------------

    def put(self, obj: JSON) -> JSON:
        """Create or replace by (kind, namespace, name), emitting ADDED or MODIFIED; a
        namespaced object without a namespace is in ``default``. Returns the stored object
        (with uid, resourceVersion and generation)."""
        kind = _kind(obj.get("kind", ""))
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("put() needs metadata.name")
        if kind.namespaced:
            meta["namespace"] = meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        with self._cond:
            return copy.deepcopy(self._write(kind, obj, self._objects.get(_key(obj))))

    def delete(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        """Delete, emitting DELETED with the last state at a new resourceVersion; returns that
        object, or None if there was none."""
        with self._cond:
            key = (_kind(kind).kind, namespace or "", name)
            if key not in self._objects:
                return None
            prev = self._objects.pop(key)
            obj = copy.deepcopy(prev)
            self._revision += 1
            obj["metadata"]["resourceVersion"] = str(self._revision)
            self._record("DELETED", obj, prev)
            return copy.deepcopy(obj)

    def get(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        with self._cond:
            return copy.deepcopy(self._objects.get((_kind(kind).kind, namespace or "", name)))

    def objects(self, kind: str) -> list[JSON]:
        """Every stored object of a kind, ordered by namespace and name."""
        k = _kind(kind).kind
        with self._cond:
            found = [o for key, o in self._objects.items() if key[0] == k]
            return copy.deepcopy(sorted(found, key=_sort_key))

    @property
    def requests(self) -> list[Request]:
        """Every request answered so far (a watch is logged when its stream starts)."""
        with self._cond:
            return list(self._requests)

    def watchers(self, kind: str | None = None) -> int:
        """Open watch streams (of one kind, or all)."""
        with self._cond:
            return sum(1 for w in self._watchers if kind is None or w.kind.kind == kind)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate`` holds, re-checking after every request, state change and
        watch opening or closing; False on timeout. The predicate runs under the server lock
        (re-entrant, so it may call this object's methods)."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # --- faults ----------------------------------------------------------------------------

    def drop_watches(self) -> int:
        """Shut down every open watch socket mid-stream (no terminating chunk), as a restarting
        apiserver or a broken load balancer does. Returns how many were dropped."""
        with self._cond:
            dropped, self._watchers = self._watchers, []
            for w in dropped:
                with contextlib.suppress(OSError):
                    w.conn.shutdown(socket.SHUT_RDWR)
                w.put(_Stop.DROP)
            self._cond.notify_all()
            return len(dropped)

    def compact(self) -> int:
        """Forget the change log up to the current revision: a watch or a continue token from
        an older resourceVersion gets 410 Gone. Returns the compaction revision."""
        with self._cond:
            self._compacted = self._revision
            self._log.clear()
            self._cond.notify_all()
            return self._compacted

    def bookmark(self) -> int:
        """Send a BOOKMARK at the current revision to every open watch that allowed bookmarks;
        returns how many got one."""
        with self._cond:
            chosen = [w for w in self._watchers if w.bookmarks]
            for w in chosen:
                w.bookmark(self._revision)
            return len(chosen)

    def fail_next(self, path_prefix: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests whose path starts with ``path_prefix`` with a
        Status of ``status`` (no Retry-After, so the client's urllib3 does not retry it)."""
        with self._cond:
            self._injections.append(_Injection(path_prefix, status, times))

    def clear_failures(self) -> None:
        """Forget every armed ``fail_next`` injection."""
        with self._cond:
            self._injections.clear()
            self._cond.notify_all()

    # --- internals (callers hold the lock) ------------------------------------------------

    def _write(self, kind: _Kind, obj: JSON, prev: JSON | None) -> JSON:
        obj["kind"], obj["apiVersion"] = kind.kind, kind.api_version
        meta = obj["metadata"]
        for system in ("uid", "creationTimestamp", "resourceVersion", "generation"):
            meta.pop(system, None)
        if prev is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            meta["generation"] = 1
        else:
            old = prev["metadata"]
            meta["uid"], meta["creationTimestamp"] = old["uid"], old["creationTimestamp"]
            meta["generation"] = old["generation"] + (obj.get("spec") != prev.get("spec"))
        self._revision += 1
        meta["resourceVersion"] = str(self._revision)
        self._objects[_key(obj)] = obj
        self._record("ADDED" if prev is None else "MODIFIED", obj, prev)
        return obj

    def _record(self, type_: str, obj: JSON, prev: JSON | None) -> None:
        # Stored objects are never mutated in place, so the log may share them.
        change = _Change(self._revision, obj["kind"], type_, obj, prev)
        self._log.append(change)
        for w in self._watchers:
            w.offer(change)
        self._cond.notify_all()

    def _snapshot(self, kind: _Kind, revision: int) -> list[JSON]:
        """The objects of a kind as they were at ``revision`` (undoing the retained log)."""
        objs = {k: o for k, o in self._objects.items() if k[0] == kind.kind}
        for change in reversed(self._log):
            if change.revision <= revision:
                break
            if change.kind != kind.kind:
                continue
            if change.type == "ADDED":
                objs.pop(_key(change.obj), None)
            elif change.prev is not None:
                objs[_key(change.obj)] = change.prev
        return list(objs.values())

    def _log_request(self, request: Request) -> None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    def _injected(self, path: str) -> None:
        with self._cond:
            for inj in self._injections:
                if path.startswith(inj.prefix):
                    inj.remaining -= 1
                    if inj.remaining <= 0:
                        self._injections.remove(inj)
                    raise _ApiError(inj.status, f"injected failure ({inj.status})")

    def _list(self, kind: _Kind, name: str | None, query: dict[str, str]) -> JSON:
        limit = _parse_int(query, "limit") if "limit" in query else 0
        start: tuple[str, str] | None = None
        with self._cond:
            if query.get("continue"):
                at, start = _parse_continue(query["continue"])
                if at < self._compacted:
                    raise _ApiError(
                        410,
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter.",
                        reason="Expired",
                    )
                objs = self._snapshot(kind, at)
            else:
                at = self._revision
                objs = [o for k, o in self._objects.items() if k[0] == kind.kind]
        items = sorted((o for o in objs if name in (None, o["metadata"]["name"])), key=_sort_key)
        if start is not None:
            items = [o for o in items if _sort_key(o) > start]
        meta: JSON = {"resourceVersion": str(at)}
        if limit and len(items) > limit:
            meta["continue"] = _continue_token(at, _sort_key(items[limit - 1]))
            items = items[:limit]
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": meta,
            "items": [_without_type(o) for o in items],
        }

    def _open_watch(
        self, kind: _Kind, name: str | None, query: dict[str, str], conn: socket.socket
    ) -> _Watcher:
        """Register a watcher with the changes after its resourceVersion queued, atomically
        with the log; a version older than the compaction point gets the 410 ERROR event."""
        if query.get("resourceVersion", "") in ("", "0"):
            raise _ApiError(400, "this fake serves watches from a resourceVersion only")
        requested = _parse_int(query, "resourceVersion")
        w = _Watcher(kind, name, _parse_bool(query, "allowWatchBookmarks"), conn)
        with self._cond:
            if requested < self._compacted:
                w.expire(requested, self._compacted)
                return w
            for change in self._log:
                if change.revision > requested:
                    w.offer(change)
            self._watchers.append(w)
            self._cond.notify_all()
        return w

    def _close_watch(self, w: _Watcher) -> None:
        with self._cond:
            if w in self._watchers:
                self._watchers.remove(w)
            self._cond.notify_all()
        w.close()

    def _create(self, kind: _Kind, namespace: str, obj: JSON) -> JSON:
        if obj.get("kind") not in (None, kind.kind):
            raise _ApiError(400, f"the kind of the object ({obj.get('kind')}) is not {kind.kind}")
        meta = obj.get("metadata")
        if not isinstance(meta, dict) or not meta.get("name"):
            raise _ApiError(
                422, f'{kind.kind} "" is invalid: metadata.name: Required value: name is required'
            )
        if meta.get("namespace") not in (None, "", namespace):
            raise _ApiError(
                400,
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
            )
        meta["namespace"] = namespace
        with self._cond:
            key = (kind.kind, namespace, meta["name"])
            if key in self._objects:
                raise _ApiError(
                    409,
                    f'{kind.resource} "{meta["name"]}" already exists',
                    reason="AlreadyExists",
                    details={"name": meta["name"], "kind": kind.plural},
                )
            return copy.deepcopy(self._write(kind, obj, None))

    def _patch(self, kind: _Kind, name: str, patch: JSON) -> JSON:
        with self._cond:
            cur = self._objects.get((kind.kind, "", name))
            if cur is None:
                raise _not_found(kind, name)
            new = _merge(cur, patch)
            meta = new.get("metadata")
            if not isinstance(meta, dict) or meta.get("name") != name:
                raise _ApiError(422, "a patch may not remove or rename metadata")
            for system in ("uid", "creationTimestamp", "resourceVersion", "generation"):
                meta[system] = cur["metadata"][system]
            if new == cur:
                return copy.deepcopy(cur)  # a no-op patch writes nothing, as in etcd
            return copy.deepcopy(self._write(kind, new, cur))

    def _authorized(self, header: str) -> bool:
        return secrets.compare_digest(header, f"Bearer {self.token}")

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _shutdown(self) -> None:
        """End every stream and idle keep-alive connection so handler threads finish."""
        self.drop_watches()
        with self._cond:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


# --- HTTP --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kube: FakeKube

    def log_message(self, format: str, *args: object) -> None:
        pass

    def handle(self) -> None:
        conn: socket.socket = self.connection
        self.kube._track(conn, True)
        try:
            super().handle()
        except OSError:
            pass  # the connection was shut down under us (drop_watches, server exit)
        finally:
            self.kube._track(conn, False)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        self._url_path = url.path
        self._query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if not self.kube._authorized(self.headers.get("Authorization", "")):
                raise _ApiError(401, "Unauthorized")
            self.kube._injected(url.path)
            self._route(body)
        except _ApiError as exc:
            self._send_json(exc.code, exc.status())

    def _send_json(self, status: int, obj: JSON) -> None:
        self.kube._log_request(Request(self.command, self._url_path, self._query, status))
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json_object(self, body: bytes) -> JSON:
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise _ApiError(400, f"error decoding request body: {exc}") from None
        if not isinstance(obj, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        return obj

    def _route(self, body: bytes) -> None:
        matched = [(r, m) for r in _ROUTES if (m := r[1].fullmatch(self._url_path.rstrip("/")))]
        if not matched:
            raise _ApiError(404, "the server could not find the requested resource", details={})
        route = next((r for r in matched if r[0][0] == self.command), None)
        if route is None:
            raise _ApiError(
                405, "the server does not allow this method on the requested resource", details={}
            )
        (_, _, kind_name, action), m = route
        kind = _KINDS[kind_name]
        if action == "collection":
            self._collection(kind)
        elif action == "read":
            obj = self.kube.get(kind.kind, "", m["name"])
            if obj is None:
                raise _not_found(kind, m["name"])
            self._send_json(200, obj)
        elif action == "patch":
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type != STRATEGIC_MERGE_PATCH:
                raise _ApiError(
                    415,
                    "the body of the request was in an unknown format - accepted media types "
                    f"include: {STRATEGIC_MERGE_PATCH}",
                )
            self._send_json(200, self.kube._patch(kind, m["name"], self._json_object(body)))
        else:
            self._send_json(201, self.kube._create(kind, m["ns"], self._json_object(body)))

    def _collection(self, kind: _Kind) -> None:
        watching = _parse_bool(self._query, "watch")
        allowed = _WATCH_PARAMS if watching else _LIST_PARAMS
        if kind.kind != "Node":
            allowed = allowed - {"fieldSelector"}
        for param in self._query:
            if param not in allowed:
                raise _ApiError(400, f"this fake does not serve {param} on {kind.resource}")
        name = None
        if "fieldSelector" in self._query:
            m = re.fullmatch(r"metadata\.name==?([^,=!]+)", self._query["fieldSelector"])
            if m is None:
                raise _ApiError(400, f"field selector not served: {self._query['fieldSelector']}")
            name = m[1]
        if watching:
            self._watch(kind, name)
        else:
            self._send_json(200, self.kube._list(kind, name, self._query))

    def _watch(self, kind: _Kind, name: str | None) -> None:
        timeout = (
            _parse_int(self._query, "timeoutSeconds") if "timeoutSeconds" in self._query else 0
        )
        deadline = time.monotonic() + timeout if timeout else None
        conn: socket.socket = self.connection
        w = self.kube._open_watch(kind, name, self._query, conn)
        try:
            self.kube._log_request(Request(self.command, self._url_path, self._query, 200))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-cache, private")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self._pump(w, conn, deadline):
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.close_connection = True
        except OSError:
            self.close_connection = True
        finally:
            self.kube._close_watch(w)

    def _pump(self, w: _Watcher, conn: socket.socket, deadline: float | None) -> bool:
        """Stream queued events until the watch ends; True for a clean end (timeout, ERROR),
        False when the stream was dropped or the client went away."""
        while True:
            while True:
                try:
                    item = w.items.get_nowait()
                except queue.Empty:
                    break
                if item is _Stop.END:
                    return True
                if item is _Stop.DROP:
                    return False
                self.wfile.write(b"%x\r\n%b\r\n" % (len(item), item))
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return True
            readable, _, _ = select.select([w.wake[0], conn], [], [], remaining)
            if w.wake[0] in readable:
                w.wake[0].recv(4096)
            if conn in readable:
                return False  # a watch client never sends; readable means it hung up


@contextlib.contextmanager
def run_fake_kube() -> Iterator[FakeKube]:
    """Serve a fake apiserver on a free 127.0.0.1 port; open watches are ended on exit.

    Requests must carry ``Authorization: Bearer <token>`` (a random token);
    :meth:`FakeKube.kubeconfig` writes a kubeconfig that does."""
    kube = FakeKube(secrets.token_hex(16))
    handler = type("Handler", (_Handler,), {"kube": kube})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    kube.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kube", daemon=True
    )
    thread.start()
    try:
        yield kube
    finally:
        server.shutdown()
        kube._shutdown()
        server.server_close()
        thread.join()
