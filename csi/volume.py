"""Volume attributes (**contract**), parsed once at the edge into a frozen value.

``model`` (required), ``verify`` (``fast`` | ``full``), ``fetch`` (``IfNotCached`` |
``CachedOnly``), plus what the kubelet adds with podInfoOnMount and for inline volumes. A typo
in an attribute name is refused rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from weightcache.csi.errors import InvalidArgument
from weightcache.daemon.errors import InvalidReference
from weightcache.daemon.references import Aliases, ModelRef, parse_reference

POD_NAME = "csi.storage.k8s.io/pod.name"
POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
POD_UID = "csi.storage.k8s.io/pod.uid"
SERVICE_ACCOUNT = "csi.storage.k8s.io/serviceAccount.name"
EPHEMERAL = "csi.storage.k8s.io/ephemeral"
KUBE_PREFIX = "csi.storage.k8s.io/"
OWN_KEYS = {"model", "verify", "fetch"}


@dataclass(frozen=True)
class VolumeAttributes:
    model: ModelRef
    verify: Literal["fast", "full"] = "fast"
    fetch: Literal["IfNotCached", "CachedOnly"] = "IfNotCached"
    pod_namespace: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None
    service_account: str | None = None
    ephemeral: bool = False


def parse_volume_attributes(
    context: Mapping[str, str], aliases: Aliases | None = None
) -> VolumeAttributes:
    """Parse volume_context (or StorageClass parameters); InvalidArgument names the field.
    The model reference comes out canonical (``aliases``: the config's registry aliases)."""
    unknown = sorted(k for k in context if k not in OWN_KEYS and not k.startswith(KUBE_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unknown volume attribute(s) {', '.join(map(repr, unknown))}; "
            "accepted: model, verify, fetch"
        )
    raw_model = context.get("model", "")
    if not raw_model:
        raise InvalidArgument("volume attribute 'model' is required (oci://, s3:// or file://)")
    try:
        model = parse_reference(raw_model, aliases)
    except InvalidReference as exc:
        raise InvalidArgument(f"volume attribute 'model': {exc}") from exc
    verify = context.get("verify", "fast")
    if verify not in ("fast", "full"):
        raise InvalidArgument(f"volume attribute 'verify' must be fast or full, not {verify!r}")
    fetch = context.get("fetch", "IfNotCached")
    if fetch not in ("IfNotCached", "CachedOnly"):
        raise InvalidArgument(
            f"volume attribute 'fetch' must be IfNotCached or CachedOnly, not {fetch!r}"
        )
    ephemeral = context.get(EPHEMERAL, "false")
    if ephemeral not in ("true", "false"):
        raise InvalidArgument(f"{EPHEMERAL} must be true or false, not {ephemeral!r}")
    return VolumeAttributes(
        model=model,
        verify=verify,  # type: ignore[arg-type]
        fetch=fetch,  # type: ignore[arg-type]
        pod_namespace=context.get(POD_NAMESPACE) or None,
        pod_name=context.get(POD_NAME) or None,
        pod_uid=context.get(POD_UID) or None,
        service_account=context.get(SERVICE_ACCOUNT) or None,
        ephemeral=ephemeral == "true",
    )
