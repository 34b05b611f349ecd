"""Kubernetes Events as this node agent writes them (core/v1, created, never updated)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

COMPONENT = "weightcache-node"


def event_body(
    involved: Mapping[str, str],
    namespace: str,
    node_name: str,
    reason: str,
    kind: str,
    message: str,
) -> dict[str, Any]:
    """An Event about ``involved`` (apiVersion, kind, name, and uid/namespace when known)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        # Object names may be 253 characters; the involved object's may be too.
        "metadata": {
            "name": f"{involved['name'][:200]}.{uuid.uuid4().hex[:16]}",
            "namespace": namespace,
        },
        "involvedObject": dict(involved),
        "reason": reason,
        "message": message[:1024],
        "type": kind,
        "source": {"component": COMPONENT, "host": node_name},
        "reportingComponent": f"weightcache.io/{COMPONENT}",
        "reportingInstance": node_name,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


NODE_EVENT_NAMESPACE = "default"
"""Where Events about cluster-scoped Nodes go, as the kubelet does."""
