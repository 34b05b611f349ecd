"""The Kubernetes calls the node agent makes, and nothing more (deploy/rbac-node.yaml grants
exactly these): list and watch Deployments and StatefulSets in all namespaces; get, watch and
patch this node; create Events.

Everything goes through the official client. Objects come back as the API's JSON (dicts), not
the client's generated models: the controller reads a handful of fields, and deserialising
every pod template into models would cost more than the rest of the controller.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from weightcache.daemon.errors import WeightcacheError

GONE = 410
PAGE = 500


class KubeError(WeightcacheError):
    """An API call failed; ``status`` is the HTTP status (0 when the connection failed)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Expired(KubeError):
    """410 Gone: the resourceVersion is too old; list again."""


@dataclass(frozen=True)
class Listing:
    items: list[dict[str, Any]]
    resource_version: str


class Kube(Protocol):
    """The few calls the warm controller makes. :class:`KubeClient` is the real one;
    ``weightcache.testing.memory.MemoryKube`` holds objects in memory for fast tests of the
    controller's decisions."""

    def list_workloads(self, kind: str) -> Listing: ...

    def watch_workloads(
        self, kind: str, resource_version: str, timeout_s: int
    ) -> Iterator[tuple[str, dict[str, Any]]]: ...

    def get_node(self, name: str) -> dict[str, Any]: ...

    def watch_node(
        self, name: str, resource_version: str, timeout_s: int
    ) -> Iterator[tuple[str, dict[str, Any]]]: ...

    def patch_node_labels(self, name: str, labels: Mapping[str, str | None]) -> None: ...

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> None: ...


class KubeClient:
    """The official client, configured from a kubeconfig file or the in-cluster service account."""

    def __init__(self, kubeconfig: str | None, request_timeout_s: float = 30.0) -> None:
        from kubernetes import client, config

        try:
            if kubeconfig:
                self._api = config.new_client_from_config(config_file=kubeconfig)
            else:
                config.load_incluster_config()
                self._api = client.ApiClient()
        except (config.ConfigException, OSError) as exc:
            where = kubeconfig or "the in-cluster service account"
            raise KubeError(
                f"cannot configure the Kubernetes client from {where}: {exc} "
                "(pass --kubeconfig, or --no-kube to run without the warm controller)"
            ) from exc
        self._apps = client.AppsV1Api(self._api)
        self._core = client.CoreV1Api(self._api)
        self._timeout = request_timeout_s

    def close(self) -> None:
        self._api.close()

    # -- workloads -----------------------------------------------------------------------------

    def list_workloads(self, kind: str) -> Listing:
        func = self._lister(kind)
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE}
            if token:
                kwargs["_continue"] = token
            doc = self._call(func, **kwargs)
            for item in doc.get("items") or []:
                item.setdefault("kind", kind)
                items.append(item)
            token = (doc.get("metadata") or {}).get("continue")
            if not token:
                return Listing(items, str(doc["metadata"]["resourceVersion"]))

    def watch_workloads(
        self, kind: str, resource_version: str, timeout_s: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        return self._watch(self._lister(kind), resource_version, timeout_s)

    def _lister(self, kind: str) -> Callable[..., Any]:
        if kind == "Deployment":
            return self._apps.list_deployment_for_all_namespaces
        if kind == "StatefulSet":
            return self._apps.list_stateful_set_for_all_namespaces
        raise ValueError(f"not a watched workload kind: {kind}")

    # -- this node -----------------------------------------------------------------------------

    def get_node(self, name: str) -> dict[str, Any]:
        return self._call(self._core.read_node, name)

    def watch_node(
        self, name: str, resource_version: str, timeout_s: int
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        return self._watch(
            self._core.list_node,
            resource_version,
            timeout_s,
            field_selector=f"metadata.name={name}",
        )

    def patch_node_labels(self, name: str, labels: Mapping[str, str | None]) -> None:
        """Merge-patch this node's labels; ``None`` removes a label."""
        self._call(self._core.patch_node, name, {"metadata": {"labels": dict(labels)}})

    # -- events --------------------------------------------------------------------------------

    def create_event(self, namespace: str, event: Mapping[str, Any]) -> None:
        self._call(self._core.create_namespaced_event, namespace, dict(event))

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        resp = self._send(func, *args, _request_timeout=self._timeout, **kwargs)
        try:
            data = resp.data
        except Exception as exc:
            raise KubeError(f"Kubernetes API unreachable: {exc}") from exc
        finally:
            resp.release_conn()
        return json.loads(data) if data else {}

    def _send(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call an API function for its raw response; any non-2xx answer raises."""
        from kubernetes.client.exceptions import ApiException

        try:
            resp = func(*args, _preload_content=False, **kwargs)
        except ApiException as exc:
            raise _error(exc.status or 0, exc.reason, exc.body) from exc
        except Exception as exc:  # urllib3 and socket errors: the API server is unreachable
            raise KubeError(f"Kubernetes API unreachable: {exc}") from exc
        if not 200 <= resp.status <= 299:
            body = resp.data
            resp.release_conn()
            raise _error(resp.status, resp.reason, body)
        return resp

    def _watch(
        self, func: Callable[..., Any], resource_version: str, timeout_s: int, **kwargs: Any
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """One watch stream: (type, object) per event, bookmarks included. An ERROR event (410
        Gone when the version was compacted away) raises; so does a broken stream. The stream
        is read here rather than through ``kubernetes.watch.Watch``, whose undeserialised mode
        cannot report ERROR events."""
        from kubernetes.watch.watch import iter_resp_lines

        resp = self._send(
            func,
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
            _request_timeout=(self._timeout, timeout_s + self._timeout),
            **kwargs,
        )
        try:
            for line in iter_resp_lines(resp):
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    code = int(status.get("code") or 0)
                    raise _error(code, status.get("reason"), json.dumps(status))
                yield str(event["type"]), event["object"]
        except KubeError:
            raise
        except Exception as exc:
            raise KubeError(f"watch interrupted: {exc}") from exc
        finally:
            resp.close()
            resp.release_conn()


def _error(status: int, reason: str | None, body: Any) -> KubeError:
    detail = reason or ""
    if body:
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(body).get("message") or detail
    message = f"Kubernetes API answered {status}: {detail}".rstrip(": ")
    return Expired(message, status) if status == GONE else KubeError(message, status)
