"""Kubernetes objects as API JSON (camelCase dicts) for tests: workloads and nodes shaped as the
apiserver would store them, for the fake apiserver and the in-memory client alike."""

from __future__ import annotations

import copy
from typing import Any

JSON = dict[str, Any]


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
