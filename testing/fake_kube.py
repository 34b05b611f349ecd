"""A fake Kubernetes API server speaking the real HTTP list/watch protocol, for node-agent tests.

The official ``kubernetes`` client talks to it on 127.0.0.1 exactly as it talks to an apiserver,
so the code under test runs unpatched: lists carry the global resourceVersion, watches are
chunked streams of one JSON event per line that resume from a retained change log, selectors
turn label changes into ADDED/DELETED for the watcher, and errors are ``Status`` objects. Faults
that are rare in a real cluster but decide whether a controller is correct (a dropped stream,
compaction into 410 Gone, bookmarks, error statuses) happen when a test asks for them.

Only what the node agent uses is served: Deployments and StatefulSets (list, watch, get), Nodes
(get, list/watch by field selector, merge, strategic-merge and JSON patches) and Events (create,
patch, list). Known simplifications: strategic merge patches treat every list as atomic (no
merge keys), no defaulting or validation beyond names, and no RBAC beyond one bearer token.
This module must not import the client: the fake is only a fake if nothing is shared.
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

JSON = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH)
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
_UNAUTHENTICATED_PATHS = ("/healthz", "/readyz", "/livez", "/version")

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
    504: "Timeout",
}


@dataclass(frozen=True)
class _Kind:
    kind: str
    api_version: str
    plural: str
    namespaced: bool
    fields: tuple[str, ...] = ()
    """Field selector labels beyond metadata.name and metadata.namespace (as the apiserver)."""

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def resource(self) -> str:
        """The qualified resource name error messages use: ``deployments.apps``, ``nodes``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def url_prefix(self) -> str:
        return "api/v1" if self.api_version == "v1" else f"apis/{self.api_version}"


_KINDS = {
    k.kind: k
    for k in (
        _Kind("Deployment", "apps/v1", "deployments", True),
        _Kind("StatefulSet", "apps/v1", "statefulsets", True),
        _Kind("Node", "v1", "nodes", False, ("spec.unschedulable",)),
        _Kind(
            "Event",
            "v1",
            "events",
            True,
            (
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ),
        ),
    )
}
_BY_URL = {(k.url_prefix, k.plural): k for k in _KINDS.values()}
_PATH = re.compile(
    r"/(?P<prefix>api/v1|apis/apps/v1)(?:/namespaces/(?P<ns>[^/]+))?"
    r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?/?"
)


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


class Patch(NamedTuple):
    path: str
    content_type: str
    body: Any
    """The parsed JSON body (the raw text if it was not JSON)."""


class _ApiError(Exception):
    """Answered as a ``Status`` object; raised anywhere while serving a request."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: JSON | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details
        self.headers = headers or {}

    def status(self) -> JSON:
        return status_object(self.code, self.message, self.reason, self.details)


def status_object(
    code: int, message: str, reason: str | None = None, details: JSON | None = None
) -> JSON:
    """A failure ``Status`` as the apiserver writes it (also the object of a watch ERROR)."""
    body: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "Unknown"),
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def _not_found(kind: _Kind, name: str) -> _ApiError:
    details: JSON = {"name": name, "kind": kind.plural}
    if kind.group:
        details["group"] = kind.group
    return _ApiError(404, f'{kind.resource} "{name}" not found', details=details)


def _too_old(requested: int, oldest: int) -> _ApiError:
    return _ApiError(410, f"too old resource version: {requested} ({oldest})", reason="Expired")


# --- selectors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str
    """``=``, ``!=``, ``in``, ``notin``, ``exists`` or ``!`` (does not exist)."""
    values: tuple[str, ...] = ()

    def matches(self, value: str | None) -> bool:
        if self.op == "exists":
            return value is not None
        if self.op == "!":
            return value is None
        if self.op in ("=", "in"):
            return value in self.values
        return value not in self.values  # != and notin also match a missing key


_LABEL_KEY = r"[A-Za-z0-9](?:[-A-Za-z0-9_./]*[A-Za-z0-9])?"
_LABEL_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"


def _split_terms(selector: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b`` is two terms)."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [t.strip() for t in terms if t.strip()]


def parse_label_selector(selector: str) -> list[_Requirement]:
    """Equality, inequality, set-based and existence requirements, as ``labels.Parse``."""
    reqs = []
    for term in _split_terms(selector):
        if m := re.fullmatch(rf"(!?)\s*({_LABEL_KEY})", term):
            reqs.append(_Requirement(m[2], "!" if m[1] else "exists"))
        elif m := re.fullmatch(rf"({_LABEL_KEY})\s*(==|=|!=)\s*({_LABEL_VALUE})", term):
            reqs.append(_Requirement(m[1], "!=" if m[2] == "!=" else "=", (m[3],)))
        elif m := re.fullmatch(rf"({_LABEL_KEY})\s+(in|notin)\s*\(([^()]*)\)", term):
            values = tuple(v.strip() for v in m[3].split(","))
            if not all(re.fullmatch(_LABEL_VALUE, v) for v in values):
                raise _ApiError(400, f"unable to parse requirement: invalid values in {term!r}")
            reqs.append(_Requirement(m[1], m[2], values))
        else:
            raise _ApiError(400, f"unable to parse requirement: {term!r}")
    return reqs


def parse_field_selector(selector: str, kind: _Kind) -> list[_Requirement]:
    """``field=value``, ``field==value`` and ``field!=value`` on the fields the kind indexes."""
    reqs = []
    for term in _split_terms(selector):
        m = re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(.*)", term)
        if m is None:
            raise _ApiError(400, f"invalid selector: {term!r}")
        key = m[1]
        if key not in ("metadata.name", "metadata.namespace", *kind.fields):
            raise _ApiError(400, f"field label not supported: {key}")
        reqs.append(_Requirement(key, "!=" if m[2] == "!=" else "=", (m[3].strip(),)))
    return reqs


def _field_value(obj: JSON, key: str) -> str:
    """A selectable field as the apiserver's field set has it: missing is the empty string."""
    value: Any = obj
    for part in ("source.component" if key == "source" else key).split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "false" if key == "spec.unschedulable" else ""
    return str(value)


@dataclass(frozen=True)
class _Filter:
    namespace: str | None
    labels: tuple[_Requirement, ...] = ()
    fields: tuple[_Requirement, ...] = ()

    def matches(self, obj: JSON) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        return all(r.matches(labels.get(r.key)) for r in self.labels) and all(
            r.matches(_field_value(obj, r.key)) for r in self.fields
        )


# --- patches -----------------------------------------------------------------------------------


class _PatchError(Exception):
    pass


_DELETE = object()


def merge_patch(target: Any, patch: Any, *, strategic: bool = False) -> Any:
    """RFC 7386 (null deletes a key; anything but an object replaces). ``strategic`` also honours
    the ``$patch: delete|replace`` directives and drops other ``$`` keys; lists stay atomic."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if strategic and patch.get("$patch") == "delete":
        return _DELETE
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    if strategic and patch.get("$patch") == "replace":
        result = {}
    for key, value in patch.items():
        if strategic and key.startswith("$"):
            continue
        merged = None if value is None else merge_patch(result.get(key), value, strategic=strategic)
        if merged is None or merged is _DELETE:
            result.pop(key, None)
        else:
            result[key] = merged
    return result


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise _PatchError(f"invalid JSON pointer {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]


def _index(seq: list[Any], token: str, *, insert: bool = False) -> int:
    if insert and token == "-":
        return len(seq)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise _PatchError(f"invalid array index {token!r}")
    i = int(token)
    if i > (len(seq) if insert else len(seq) - 1):
        raise _PatchError(f"array index {i} out of bounds")
    return i


def _resolve(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(doc, token)]
        else:
            raise _PatchError(f"path element {token!r} does not exist")
    return doc


def _add(doc: Any, tokens: list[str], value: Any, *, replace: bool = False) -> Any:
    if not tokens:
        return value
    parent, last = _resolve(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise _PatchError(f"cannot replace missing key {last!r}")
        parent[last] = value
    elif isinstance(parent, list):
        if replace:
            parent[_index(parent, last)] = value
        else:
            parent.insert(_index(parent, last, insert=True), value)
    else:
        raise _PatchError(f"cannot add {last!r} to a {type(parent).__name__}")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise _PatchError("cannot remove the whole document")
    parent, last = _resolve(doc, tokens[:-1]), tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _PatchError(f"cannot remove missing key {last!r}")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last))
    raise _PatchError(f"cannot remove {last!r} from a {type(parent).__name__}")


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902: add, remove, replace, move, copy and test, with ``~1``/``~0`` escapes."""
    if not isinstance(ops, list):
        raise _PatchError("a JSON patch is a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        try:
            name, path = op["op"], _pointer(op["path"])
            if name == "add":
                doc = _add(doc, path, copy.deepcopy(op["value"]))
            elif name == "remove":
                _remove(doc, path)
            elif name == "replace":
                doc = _add(doc, path, copy.deepcopy(op["value"]), replace=True)
            elif name == "move":
                doc = _add(doc, path, _remove(doc, _pointer(op["from"])))
            elif name == "copy":
                doc = _add(doc, path, copy.deepcopy(_resolve(doc, _pointer(op["from"]))))
            elif name == "test":
                if _resolve(doc, path) != op["value"]:
                    raise _PatchError(f"test failed at {op['path']!r}")
            else:
                raise _PatchError(f"unknown operation {name!r}")
        except (KeyError, TypeError) as exc:
            raise _PatchError(f"malformed operation {op!r}") from exc
    return doc


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
    filter: _Filter
    bookmarks: bool
    conn: socket.socket
    last_rv: int = 0
    items: queue.SimpleQueue[bytes | _Stop] = field(default_factory=queue.SimpleQueue)
    wake: tuple[socket.socket, socket.socket] = field(default_factory=socket.socketpair)

    def __post_init__(self) -> None:
        self.wake[1].setblocking(False)

    def put(self, item: bytes | _Stop) -> None:
        self.items.put(item)
        # A full wake buffer means a wake-up is already pending.
        with contextlib.suppress(OSError):
            self.wake[1].send(b"\0")

    def event(self, type_: str, obj: JSON, revision: int) -> None:
        self.put(_event_line(type_, obj))
        self.last_rv = max(self.last_rv, revision)

    def offer(self, change: _Change) -> None:
        """Deliver a change as the apiserver does: through the filter, so an object that starts
        or stops matching is ADDED or DELETED for this watcher."""
        if change.kind != self.kind.kind:
            return
        now = self.filter.matches(change.obj)
        if change.type == "MODIFIED":
            was = change.prev is not None and self.filter.matches(change.prev)
            if was and now:
                self.event("MODIFIED", change.obj, change.revision)
            elif was:
                self.event("DELETED", change.obj, change.revision)
            elif now:
                self.event("ADDED", change.obj, change.revision)
        elif now:
            self.event(change.type, change.obj, change.revision)

    def bookmark(self, revision: int, annotations: dict[str, str] | None = None) -> None:
        meta: JSON = {"resourceVersion": str(revision)}
        if annotations:
            meta["annotations"] = annotations
        obj = {"kind": self.kind.kind, "apiVersion": self.kind.api_version, "metadata": meta}
        self.event("BOOKMARK", obj, revision)

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
    method: str | None
    headers: dict[str, str]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


def _parse_rv(value: str) -> int:
    if not value.isdigit():
        raise _ApiError(400, f"invalid resource version {value!r}")
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

    def __init__(self, token: str, require_auth: bool) -> None:
        self.token = token
        self.require_auth = require_auth
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
        self._patches: list[Patch] = []
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
        is a directory) for ``kubernetes.config.new_client_from_config`` or
        ``load_kube_config``. JSON is YAML, so no YAML writer is needed."""
        if path.is_dir():
            path = path / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": "default"},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    # --- state API -------------------------------------------------------------------------

    def put(self, obj: JSON) -> JSON:
        """Create or replace by (kind, namespace, name), emitting ADDED or MODIFIED. A given uid
        or creationTimestamp is kept on create; a namespaced object without one is in
        ``default``. Returns the stored object (with resourceVersion)."""
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
            prev = self._objects.get((kind.kind, meta.get("namespace", ""), meta["name"]))
            return copy.deepcopy(self._write(kind, obj, prev, trusted=True))

    def delete(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        """Delete, emitting DELETED with the last state at a new resourceVersion; returns that
        object, or None if there was none."""
        with self._cond:
            key = (_kind(kind).kind, namespace or "", name)
            if key not in self._objects:
                return None
            return copy.deepcopy(self._remove(key))

    def get(self, kind: str, namespace: str | None, name: str) -> JSON | None:
        with self._cond:
            obj = self._objects.get((_kind(kind).kind, namespace or "", name))
            return copy.deepcopy(obj)

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

    @property
    def patches(self) -> list[Patch]:
        with self._cond:
            return list(self._patches)

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

    def compact(self, expire_open: bool = False) -> int:
        """Forget the change log up to the current revision: a watch, an Exact list or a
        continue token from an older resourceVersion gets 410 Gone. With ``expire_open``, open
        watches behind the current revision (last sent an older event or bookmark) get the
        410 ERROR event and end, as when a slow watcher falls out of the apiserver's window.
        Returns the compaction revision."""
        with self._cond:
            self._compacted = self._revision
            self._log.clear()
            if expire_open:
                behind = [w for w in self._watchers if w.last_rv < self._compacted]
                for w in behind:
                    self._watchers.remove(w)
                    w.expire(w.last_rv, self._compacted)
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

    def fail_next(
        self,
        path_prefix: str,
        status: int,
        times: int = 1,
        *,
        method: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``times`` requests whose path starts with ``path_prefix`` (and whose
        method is ``method``, if given) with a Status of ``status``. A 429 carries
        ``Retry-After: 0`` (the apiserver always sends one) unless ``retry_after`` says
        otherwise; any status carries it if ``retry_after`` is given. Note that the client's
        urllib3 retries 413/429/503 answers that have Retry-After up to 3 times by itself, so
        such a failure reaches the caller only from the 4th in a row."""
        if retry_after is None and status == 429:
            retry_after = 0
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        with self._cond:
            self._injections.append(_Injection(path_prefix, status, times, method, headers))

    def clear_failures(self) -> None:
        """Forget every armed ``fail_next`` injection."""
        with self._cond:
            self._injections.clear()
            self._cond.notify_all()

    # --- internals (callers hold the lock) ------------------------------------------------

    def _write(self, kind: _Kind, obj: JSON, prev: JSON | None, *, trusted: bool) -> JSON:
        obj = copy.deepcopy(obj)
        obj["kind"], obj["apiVersion"] = kind.kind, kind.api_version
        meta = obj["metadata"]
        for system in ("resourceVersion", "generation", "deletionTimestamp"):
            meta.pop(system, None)
        if prev is None:
            if not trusted:
                meta.pop("uid", None)
                meta.pop("creationTimestamp", None)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta["generation"] = 1
        else:
            old = prev["metadata"]
            meta["uid"], meta["creationTimestamp"] = old["uid"], old["creationTimestamp"]
            meta["generation"] = old["generation"] + (obj.get("spec") != prev.get("spec"))
        self._revision += 1
        meta["resourceVersion"] = str(self._revision)
        self._objects[_key(obj)] = obj
        self._record(kind, "ADDED" if prev is None else "MODIFIED", obj, prev)
        return obj

    def _remove(self, key: tuple[str, str, str]) -> JSON:
        prev = self._objects.pop(key)
        obj = copy.deepcopy(prev)
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        self._record(_KINDS[key[0]], "DELETED", obj, prev)
        return obj

    def _record(self, kind: _Kind, type_: str, obj: JSON, prev: JSON | None) -> None:
        # Stored objects are never mutated in place, so the log may share them.
        change = _Change(self._revision, kind.kind, type_, obj, prev)
        self._log.append(change)
        for w in self._watchers:
            w.offer(change)
        self._cond.notify_all()

    def _snapshot(self, kind: _Kind, revision: int) -> list[JSON]:
        """The objects of a kind as they were at ``revision`` (undoing the retained log)."""
        if revision < self._compacted:
            raise _too_old(revision, self._compacted)
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

    def _injected(self, method: str, path: str) -> None:
        with self._cond:
            for inj in self._injections:
                if path.startswith(inj.prefix) and inj.method in (None, method):
                    inj.remaining -= 1
                    if inj.remaining <= 0:
                        self._injections.remove(inj)
                    details = (
                        {"retryAfterSeconds": int(inj.headers["Retry-After"])}
                        if inj.headers
                        else None
                    )
                    raise _ApiError(
                        inj.status,
                        f"injected failure ({inj.status})",
                        details=details,
                        headers=inj.headers,
                    )

    def _list(self, kind: _Kind, flt: _Filter, query: dict[str, str]) -> JSON:
        rv, match = query.get("resourceVersion", ""), query.get("resourceVersionMatch", "")
        limit = int(query["limit"]) if query.get("limit", "").isdigit() else 0
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
            elif match == "Exact":
                at = _parse_rv(rv)
                if at > self._revision:
                    raise _ApiError(
                        504,
                        f"Too large resource version: {at}, current: {self._revision}",
                        reason="Timeout",
                    )
                objs = self._snapshot(kind, at)
            else:
                at = self._revision
                objs = [o for k, o in self._objects.items() if k[0] == kind.kind]
            items = sorted((o for o in objs if flt.matches(o)), key=_sort_key)
        if start is not None:
            items = [o for o in items if _sort_key(o) > start]
        meta: JSON = {"resourceVersion": str(at)}
        if limit and len(items) > limit:
            meta["continue"] = _continue_token(at, _sort_key(items[limit - 1]))
            if not flt.labels and not flt.fields:
                meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": meta,
            "items": [_without_type(o) for o in items],
        }

    def _open_watch(
        self, kind: _Kind, flt: _Filter, query: dict[str, str], conn: socket.socket
    ) -> _Watcher:
        """Register a watcher with its first events queued, atomically with the log."""
        rv = query.get("resourceVersion", "")
        bookmarks = _parse_bool(query, "allowWatchBookmarks")
        initial = _parse_bool(query, "sendInitialEvents")
        if initial and not (bookmarks and query.get("resourceVersionMatch") == "NotOlderThan"):
            raise _ApiError(
                422,
                "sendInitialEvents requires allowWatchBookmarks=true and "
                "resourceVersionMatch=NotOlderThan",
            )
        requested = 0 if rv in ("", "0") else _parse_rv(rv)
        w = _Watcher(kind=kind, filter=flt, bookmarks=bookmarks, conn=conn)
        with self._cond:
            if initial or rv in ("", "0"):
                current = [o for k, o in self._objects.items() if k[0] == kind.kind]
                for obj in sorted((o for o in current if flt.matches(o)), key=_sort_key):
                    w.event("ADDED", obj, int(obj["metadata"]["resourceVersion"]))
                w.last_rv = self._revision
                if initial:
                    w.bookmark(self._revision, {INITIAL_EVENTS_END: "true"})
            elif requested < self._compacted:
                w.expire(requested, self._compacted)
                return w
            else:
                w.last_rv = requested
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
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        if kind.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise _ApiError(
                    400,
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request",
                )
            meta["namespace"] = namespace
        with self._cond:
            if not meta.get("name"):
                if not meta.get("generateName"):
                    raise _ApiError(
                        422,
                        f'{kind.kind} "" is invalid: metadata.name: Required value: name or '
                        "generateName is required",
                    )
                alphabet = "bcdfghjklmnpqrstvwxz2456789"
                while True:
                    suffix = "".join(secrets.choice(alphabet) for _ in range(5))
                    meta["name"] = meta["generateName"] + suffix
                    if (kind.kind, namespace, meta["name"]) not in self._objects:
                        break
            key = (kind.kind, namespace, meta["name"])
            if key in self._objects:
                details: JSON = {"name": meta["name"], "kind": kind.plural}
                if kind.group:
                    details["group"] = kind.group
                raise _ApiError(
                    409,
                    f'{kind.resource} "{meta["name"]}" already exists',
                    reason="AlreadyExists",
                    details=details,
                )
            return copy.deepcopy(self._write(kind, obj, None, trusted=False))

    def _patch(self, kind: _Kind, key: tuple[str, str, str], content_type: str, body: Any) -> JSON:
        with self._cond:
            cur = self._objects.get(key)
            if cur is None:
                raise _not_found(kind, key[2])
            try:
                if content_type == JSON_PATCH:
                    new = json_patch(cur, body)
                elif not isinstance(body, dict):
                    raise _PatchError("a merge patch body must be a JSON object")
                else:
                    new = merge_patch(cur, body, strategic=content_type == STRATEGIC_MERGE_PATCH)
            except _PatchError as exc:
                raise _ApiError(422, f"the server rejected our request: {exc}") from None
            if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
                raise _ApiError(422, "the patched object has no metadata")
            meta = new["metadata"]
            if meta.get("name") != key[2] or (meta.get("namespace") or "") != key[1]:
                raise _ApiError(
                    400,
                    f"the name of the object ({meta.get('name')}) does not match the name on "
                    f"the URL ({key[2]})",
                )
            rv = meta.get("resourceVersion")
            if rv is not None and rv != cur["metadata"]["resourceVersion"]:
                raise _ApiError(
                    409,
                    f'Operation cannot be fulfilled on {kind.resource} "{key[2]}": the object '
                    "has been modified; please apply your changes to the latest version and "
                    "try again",
                    details={"name": key[2], "kind": kind.plural},
                )
            new["kind"], new["apiVersion"] = kind.kind, kind.api_version
            for system in ("uid", "creationTimestamp", "resourceVersion", "generation"):
                meta[system] = cur["metadata"][system]
            if new == cur:
                return copy.deepcopy(cur)  # a no-op patch writes nothing, as in etcd
            return copy.deepcopy(self._write(kind, new, cur, trusted=False))

    def _delete_api(self, kind: _Kind, key: tuple[str, str, str]) -> JSON:
        with self._cond:
            if key not in self._objects:
                raise _not_found(kind, key[2])
            obj = self._remove(key)
        details: JSON = {"name": key[2], "kind": kind.plural, "uid": obj["metadata"]["uid"]}
        if kind.group:
            details["group"] = kind.group
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    def _authorized(self, path: str, header: str) -> bool:
        if not self.require_auth or path in _UNAUTHENTICATED_PATHS:
            return True
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
            body = self._read_body()
            if not self.kube._authorized(url.path, self.headers.get("Authorization", "")):
                raise _ApiError(401, "Unauthorized")
            self.kube._injected(self.command, url.path)
            self._route(body)
        except _ApiError as exc:
            self._send_json(exc.code, exc.status(), exc.headers)

    def _read_body(self) -> bytes:
        if length := self.headers.get("Content-Length"):
            return self.rfile.read(int(length))
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return b""
        body = bytearray()
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return bytes(body)

    def _send_json(self, status: int, obj: JSON, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self._send(status, body, "application/json", headers)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.kube._log_request(Request(self.command, self._url_path, self._query, status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json_body(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _ApiError(400, f"error decoding request body: {exc}") from None

    def _route(self, body: bytes) -> None:
        path, method = self._url_path, self.command
        if path in ("/healthz", "/readyz", "/livez") and method == "GET":
            self._send(200, b"ok", "text/plain; charset=utf-8")
            return
        if path == "/version" and method == "GET":
            version = {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": ""}
            self._send_json(200, version)
            return
        m = _PATH.fullmatch(path)
        kind = _BY_URL.get((m["prefix"], m["plural"])) if m else None
        if m is None or kind is None or (bool(m["ns"]) and not kind.namespaced):
            raise _ApiError(404, "the server could not find the requested resource", details={})
        ns, name = m["ns"] or "", m["name"]
        if name is None:
            if method == "GET":
                flt = _Filter(
                    namespace=ns or None,
                    labels=tuple(parse_label_selector(self._query.get("labelSelector", ""))),
                    fields=tuple(parse_field_selector(self._query.get("fieldSelector", ""), kind)),
                )
                if _parse_bool(self._query, "watch"):
                    self._watch(kind, flt)
                else:
                    self._send_json(200, self.kube._list(kind, flt, self._query))
                return
            if method == "POST" and (ns or not kind.namespaced):
                obj = self._json_body(body)
                if not isinstance(obj, dict):
                    raise _ApiError(400, "the request body must be a JSON object")
                self._send_json(201, self.kube._create(kind, ns, obj))
                return
        elif kind.namespaced and not ns:
            raise _ApiError(404, "the server could not find the requested resource", details={})
        else:
            key = (kind.kind, ns, name)
            if method == "GET":
                obj = self.kube.get(kind.kind, ns, name)
                if obj is None:
                    raise _not_found(kind, name)
                self._send_json(200, obj)
                return
            if method == "PATCH":
                self._send_json(200, self._patch(kind, key, body))
                return
            if method == "DELETE":
                self._send_json(200, self.kube._delete_api(kind, key))
                return
        raise _ApiError(
            405, "the server does not allow this method on the requested resource", details={}
        )

    def _patch(self, kind: _Kind, key: tuple[str, str, str], body: bytes) -> JSON:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        try:
            patch: Any = json.loads(body)
        except ValueError:
            patch = body.decode(errors="replace")
        with self.kube._cond:
            self.kube._patches.append(Patch(self._url_path, content_type, patch))
            self.kube._cond.notify_all()
        if content_type not in PATCH_TYPES:
            raise _ApiError(
                415,
                "the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(PATCH_TYPES)}",
            )
        if isinstance(patch, str):
            raise _ApiError(400, "error decoding patch: the body is not JSON")
        return self.kube._patch(kind, key, content_type, patch)

    def _watch(self, kind: _Kind, flt: _Filter) -> None:
        timeout = self._query.get("timeoutSeconds", "")
        if timeout and not timeout.isdigit():
            raise _ApiError(400, f"invalid timeoutSeconds {timeout!r}")
        deadline = time.monotonic() + int(timeout) if timeout and int(timeout) > 0 else None
        conn: socket.socket = self.connection
        w = self.kube._open_watch(kind, flt, self._query, conn)
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
def run_fake_kube(token: str | None = None, require_auth: bool = True) -> Iterator[FakeKube]:
    """Serve a fake apiserver on a free 127.0.0.1 port; open watches are ended on exit.

    Requests must carry ``Authorization: Bearer <token>`` (a random token unless given) when
    ``require_auth``; :meth:`FakeKube.kubeconfig` writes a kubeconfig that does."""
    kube = FakeKube(token or secrets.token_hex(16), require_auth)
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


# --- builders ----------------------------------------------------------------------------------


def _pod_template(
    app: str,
    node_selector: dict[str, str] | None,
    affinity: JSON | None,
    tolerations: list[JSON] | None,
) -> JSON:
    spec: JSON = {"containers": [{"name": "app", "image": "busybox:1.36.1"}]}
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if affinity:
        spec["affinity"] = copy.deepcopy(affinity)
    if tolerations:
        spec["tolerations"] = copy.deepcopy(tolerations)
    return {"metadata": {"labels": {"app": app}}, "spec": spec}


def _workload(
    kind: str,
    name: str,
    namespace: str,
    annotations: dict[str, str] | None,
    node_selector: dict[str, str] | None,
    affinity: JSON | None,
    tolerations: list[JSON] | None,
    replicas: int,
) -> JSON:
    meta: JSON = {"name": name, "namespace": namespace, "labels": {"app": name}}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": meta,
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": _pod_template(name, node_selector, affinity, tolerations),
        },
    }


def deployment(
    name: str,
    namespace: str = "default",
    annotations: dict[str, str] | None = None,
    node_selector: dict[str, str] | None = None,
    affinity: JSON | None = None,
    tolerations: list[JSON] | None = None,
    replicas: int = 1,
) -> JSON:
    """A Deployment the typed client accepts (selector, template, a named container); the
    annotations go on the Deployment, the scheduling constraints on its pod template."""
    return _workload(
        "Deployment", name, namespace, annotations, node_selector, affinity, tolerations, replicas
    )


def statefulset(
    name: str,
    namespace: str = "default",
    annotations: dict[str, str] | None = None,
    node_selector: dict[str, str] | None = None,
    affinity: JSON | None = None,
    tolerations: list[JSON] | None = None,
    replicas: int = 1,
) -> JSON:
    """A StatefulSet shaped like :func:`deployment` (plus serviceName)."""
    obj = _workload(
        "StatefulSet", name, namespace, annotations, node_selector, affinity, tolerations, replicas
    )
    obj["spec"]["serviceName"] = name
    return obj


def node(name: str, labels: dict[str, str] | None = None, taints: list[JSON] | None = None) -> JSON:
    """A Node with the labels a kubelet sets (hostname, os) plus ``labels``, and ``taints``
    (each needs ``key`` and ``effect``)."""
    spec: JSON = {"taints": copy.deepcopy(taints)} if taints else {}
    kubelet_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {**kubelet_labels, **(labels or {})},
        },
        "spec": spec,
    }
