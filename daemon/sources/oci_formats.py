"""Read an OCI manifest as a model: ORAS artifact, KitOps ModelKit, CNCF ModelPack or image.

Pure functions over parsed JSON: no I/O, so every hostile manifest can be tested directly.
Unknown media types fail with a message naming them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from weightcache.daemon.errors import UnsafeContent, UnsupportedManifest
from weightcache.daemon.plan import Compression, Item, RemoteArchive, RemoteFile, safe_relpath

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = {OCI_INDEX, DOCKER_LIST}
MANIFEST_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}

KIT_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
KIT_ARTIFACT = "application/vnd.kitops.modelkit.manifest.v1+json"
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
IMAGE_CONFIGS = {
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
}
TITLE = "org.opencontainers.image.title"
MODELPACK_FILEPATH = "org.cncf.model.filepath"
ORAS_UNPACK = "io.deis.oras.content.unpack"

MAX_LAYER_BYTES = 1 << 50  # 1 PiB: anything larger is a hostile or broken manifest
MAX_LAYERS = 100_000
IMAGE_MODEL_ROOT = "models"

_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_KIT_LAYER = re.compile(
    r"application/vnd\.kitops\.modelkit\.(model|modelpart|dataset|code|docs)\.v1\.tar"
    r"(?:\+(gzip|zstd))?"
)
_MODELPACK_LAYER = re.compile(
    r"application/vnd\.cncf\.model\.(weight|weight\.config|doc|code|dataset)\.v1\."
    r"(raw|tar|tar\+gzip|tar\+zstd)"
)
_IMAGE_LAYERS: Mapping[str, Compression] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}


def pick_from_index(index: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The one platform-free manifest of an index, or a clear failure."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise UnsupportedManifest(f"{where}: image index lists no manifests")
    free = [e for e in entries if isinstance(e, dict) and not e.get("platform")]
    if not free:
        platforms = sorted(
            "/".join(
                str(e["platform"].get(k, "")) for k in ("os", "architecture") if k in e["platform"]
            )
            for e in entries
            if isinstance(e, dict) and isinstance(e.get("platform"), dict)
        )
        raise UnsupportedManifest(
            f"{where}: image index has only platform-specific manifests "
            f"({', '.join(platforms)}); reference one of them by digest"
        )
    chosen = free[0]
    descriptor(chosen, where)
    if chosen.get("mediaType") in INDEX_TYPES:
        raise UnsupportedManifest(f"{where}: nested image indexes are not supported")
    return chosen


def descriptor(d: Any, where: str) -> tuple[str, int, str]:
    """Validate a descriptor; return (digest, size, mediaType)."""
    if not isinstance(d, dict):
        raise UnsupportedManifest(f"{where}: descriptor is not an object")
    digest, size, media_type = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise UnsupportedManifest(f"{where}: digest {digest!r} is not a sha256 digest")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise UnsafeContent(f"{where}: size {size!r} of {digest} is not a non-negative integer")
    if size > MAX_LAYER_BYTES:
        raise UnsafeContent(f"{where}: size {size} of {digest} is absurd (over 1 PiB)")
    if not isinstance(media_type, str):
        raise UnsupportedManifest(f"{where}: mediaType of {digest} is not a string")
    return digest, size, media_type


def interpret(manifest: Mapping[str, Any], where: str) -> tuple[str, list[Item]]:
    """Return (format, items) for an image manifest, or raise naming what is not accepted."""
    if manifest.get("schemaVersion") != 2:
        raise UnsupportedManifest(f"{where}: schemaVersion {manifest.get('schemaVersion')!r}")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise UnsupportedManifest(f"{where}: manifest has no layers list")
    if len(layers) > MAX_LAYERS:
        raise UnsafeContent(f"{where}: {len(layers)} layers is more than {MAX_LAYERS}")
    _, _, config_type = descriptor(manifest.get("config"), f"{where} config")
    artifact_type = manifest.get("artifactType", "")
    if config_type == KIT_CONFIG or artifact_type == KIT_ARTIFACT:
        return "modelkit", _modelkit(layers, where)
    if config_type == MODELPACK_CONFIG or artifact_type == MODELPACK_ARTIFACT:
        return "modelpack", _modelpack(layers, where)
    if config_type in IMAGE_CONFIGS and not artifact_type:
        return "image", _image(layers, where)
    if layers and all(
        isinstance(x, dict) and TITLE in (x.get("annotations") or {}) for x in layers
    ):
        return "oras", _oras(layers, where)
    kinds = sorted({str(x.get("mediaType")) for x in layers if isinstance(x, dict)})
    raise UnsupportedManifest(
        f"{where}: not a model artifact weightcache knows (config {config_type!r}, "
        f"artifactType {artifact_type!r}, layers {', '.join(kinds) or 'none'}); accepted: "
        "ORAS artifacts with title annotations, KitOps ModelKits, CNCF ModelPack, images"
    )


def _annotations(layer: Mapping[str, Any]) -> Mapping[str, str]:
    ann = layer.get("annotations") or {}
    if not isinstance(ann, dict):
        raise UnsupportedManifest("layer annotations are not an object")
    return ann


def _oras(layers: list[Any], where: str) -> list[Item]:
    items: list[Item] = []
    for layer in layers:
        digest, size, media_type = descriptor(layer, where)
        ann = _annotations(layer)
        path = safe_relpath(ann[TITLE], what=f"{where} layer {digest}")
        if ann.get(ORAS_UNPACK) == "true":
            compression: Compression = "gzip" if media_type.endswith("gzip") else "none"
            # A directory pushed by oras: its tar entries are already prefixed with the title.
            items.append(
                RemoteArchive(locator=digest, size=size, sha256=digest, compression=compression)
            )
        else:
            items.append(RemoteFile(path=path, size=size, locator=digest, sha256=digest))
    return items


def _modelkit(layers: list[Any], where: str) -> list[Item]:
    items: list[Item] = []
    for layer in layers:
        digest, size, media_type = descriptor(layer, where)
        m = _KIT_LAYER.fullmatch(media_type)
        if m is None:
            raise UnsupportedManifest(f"{where}: unknown ModelKit layer media type {media_type!r}")
        compression: Compression = m.group(2) or "none"  # type: ignore[assignment]
        items.append(
            RemoteArchive(locator=digest, size=size, sha256=digest, compression=compression)
        )
    return items


def _modelpack(layers: list[Any], where: str) -> list[Item]:
    items: list[Item] = []
    for layer in layers:
        digest, size, media_type = descriptor(layer, where)
        m = _MODELPACK_LAYER.fullmatch(media_type)
        if m is None:
            raise UnsupportedManifest(f"{where}: unknown ModelPack layer media type {media_type!r}")
        fmt = m.group(2)
        if fmt == "raw":
            raw_path = _annotations(layer).get(MODELPACK_FILEPATH)
            if raw_path is None:
                raise UnsupportedManifest(
                    f"{where}: raw ModelPack layer {digest} has no {MODELPACK_FILEPATH} annotation"
                )
            path = safe_relpath(raw_path, what=f"{where} layer {digest}")
            items.append(RemoteFile(path=path, size=size, locator=digest, sha256=digest))
        else:
            compression: Compression = {"tar": "none", "tar+gzip": "gzip", "tar+zstd": "zstd"}[fmt]  # type: ignore[assignment]
            items.append(
                RemoteArchive(locator=digest, size=size, sha256=digest, compression=compression)
            )
    return items


def _image(layers: list[Any], where: str) -> list[Item]:
    items: list[Item] = []
    for layer in layers:
        digest, size, media_type = descriptor(layer, where)
        compression = _IMAGE_LAYERS.get(media_type)
        if compression is None:
            raise UnsupportedManifest(f"{where}: unknown image layer media type {media_type!r}")
        items.append(
            RemoteArchive(
                locator=digest,
                size=size,
                sha256=digest,
                compression=compression,
                root=IMAGE_MODEL_ROOT,
                whiteouts=True,
            )
        )
    return items
