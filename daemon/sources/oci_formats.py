"""Read an OCI manifest as a model: ORAS artifact, KitOps ModelKit, CNCF ModelPack or image.

Pure functions over the registry's bytes: no I/O (the one manifest an index points to is read
through a callback), so every hostile document can be tested directly. Every field read is
checked for its JSON type and bounds (nesting depth, counts, sizes, digests, annotation values)
and anything else is an :class:`UnsupportedManifest` or :class:`UnsafeContent` naming it.
Unknown media types fail with a message naming them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

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
MAX_INDEX_ENTRIES = 10_000
MAX_JSON_DEPTH = 32
"""Manifests nest five levels deep (manifest, layers, descriptor, annotations, value)."""
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


ManifestFetch = Callable[[str], tuple[bytes, str, str]]
"""Reads a manifest by digest: returns (body, Content-Type, digest of the body)."""


def load_document(body: bytes, where: str) -> dict[str, Any]:
    """Parse a manifest or index: a JSON object at most :data:`MAX_JSON_DEPTH` deep."""
    try:
        doc = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise UnsupportedManifest(f"{where}: manifest nests too deeply") from exc
    except ValueError as exc:  # also bad UTF-8, and integers of more than 4300 digits
        raise UnsupportedManifest(f"{where}: manifest is not JSON: {_show(str(exc))}") from exc
    if not isinstance(doc, dict):
        raise UnsupportedManifest(f"{where}: manifest is not a JSON object")
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise UnsupportedManifest(
                f"{where}: manifest nests more than {MAX_JSON_DEPTH} levels deep"
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return doc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def document_kind(
    doc: Mapping[str, Any], content_type: str, where: str
) -> Literal["index", "manifest"]:
    """Whether a parsed document is an image index or an image manifest; other types fail."""
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise UnsupportedManifest(f"{where}: mediaType {_show(declared)} is not a string")
    media_type = declared or content_type
    if media_type in INDEX_TYPES or (not media_type and "manifests" in doc):
        return "index"
    if media_type and media_type not in MANIFEST_TYPES:
        raise UnsupportedManifest(f"{where}: unsupported manifest media type {_show(media_type)}")
    return "manifest"


def read_model(
    body: bytes, content_type: str, digest: str, fetch: ManifestFetch, where: str
) -> tuple[str, str, list[Item]]:
    """Interpret what a reference names; return (manifest digest, format, items).

    An index is followed to its one platform-free manifest (read with ``fetch``); the digest
    returned is that manifest's."""
    doc = load_document(body, where)
    if document_kind(doc, content_type, where) == "index":
        chosen, size = pick_from_index(doc, where)
        body, content_type, digest = fetch(chosen["digest"])
        if len(body) != size:
            raise UnsupportedManifest(
                f"{where}: manifest {chosen['digest']} is {len(body)} bytes, the index says {size}"
            )
        doc = load_document(body, where)
        if document_kind(doc, content_type, where) == "index":
            raise UnsupportedManifest(f"{where}: nested image indexes are not supported")
    fmt, items = interpret(doc, where)
    return digest, fmt, items


def pick_from_index(index: Mapping[str, Any], where: str) -> tuple[dict[str, Any], int]:
    """The one platform-free manifest of an index and its size, or a clear failure."""
    _schema_version(index, where)
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise UnsupportedManifest(f"{where}: image index lists no manifests")
    if len(entries) > MAX_INDEX_ENTRIES:
        raise UnsafeContent(
            f"{where}: image index lists {len(entries)} manifests, more than {MAX_INDEX_ENTRIES}"
        )
    free: list[tuple[dict[str, Any], int]] = []
    platforms: list[str] = []
    for i, entry in enumerate(entries):
        _, size, media_type = descriptor(entry, f"{where} index entry {i}")
        platform = entry.get("platform")
        if platform is not None and not isinstance(platform, dict):
            raise UnsupportedManifest(f"{where}: index entry {i} platform is not an object")
        if not platform:
            if media_type in INDEX_TYPES:
                raise UnsupportedManifest(f"{where}: nested image indexes are not supported")
            free.append((entry, size))
            continue
        for key in ("os", "architecture"):
            if not isinstance(platform.get(key, ""), str):
                raise UnsupportedManifest(
                    f"{where}: index entry {i} platform {key} is not a string"
                )
        platforms.append(
            "/".join(str(platform[k]) for k in ("os", "architecture") if k in platform)
        )
    if not free:
        shown = ", ".join(_show(p, quote=False) for p in sorted(platforms)[:10])
        raise UnsupportedManifest(
            f"{where}: image index has only platform-specific manifests "
            f"({shown}); reference one of them by digest"
        )
    return free[0]


def descriptor(d: Any, where: str) -> tuple[str, int, str]:
    """Validate a descriptor; return (digest, size, mediaType)."""
    if not isinstance(d, dict):
        raise UnsupportedManifest(f"{where}: descriptor is not an object")
    digest, size, media_type = d.get("digest"), d.get("size"), d.get("mediaType", "")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise UnsupportedManifest(f"{where}: digest {_show(digest)} is not a sha256 digest")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise UnsafeContent(
            f"{where}: size {_show(size)} of {digest} is not a non-negative integer"
        )
    if size > MAX_LAYER_BYTES:
        raise UnsafeContent(f"{where}: size {size} of {digest} is absurd (over 1 PiB)")
    if not isinstance(media_type, str):
        raise UnsupportedManifest(f"{where}: mediaType of {digest} is not a string")
    _string_map(d.get("annotations"), f"{where}: annotations of {digest}")
    return digest, size, media_type


def interpret(manifest: Mapping[str, Any], where: str) -> tuple[str, list[Item]]:
    """Return (format, items) for an image manifest, or raise naming what is not accepted."""
    _schema_version(manifest, where)
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise UnsupportedManifest(f"{where}: manifest has no layers list")
    if len(layers) > MAX_LAYERS:
        raise UnsafeContent(f"{where}: {len(layers)} layers is more than {MAX_LAYERS}")
    _, _, config_type = descriptor(manifest.get("config"), f"{where} config")
    for i, layer in enumerate(layers):
        descriptor(layer, f"{where} layer {i}")
    artifact_type = manifest.get("artifactType", "")
    if not isinstance(artifact_type, str):
        raise UnsupportedManifest(f"{where}: artifactType {_show(artifact_type)} is not a string")
    _string_map(manifest.get("annotations"), f"{where}: manifest annotations")
    if config_type == KIT_CONFIG or artifact_type == KIT_ARTIFACT:
        return "modelkit", _modelkit(layers, where)
    if config_type == MODELPACK_CONFIG or artifact_type == MODELPACK_ARTIFACT:
        return "modelpack", _modelpack(layers, where)
    if config_type in IMAGE_CONFIGS and not artifact_type:
        return "image", _image(layers, where)
    if layers and all(TITLE in _annotations(x) for x in layers):
        return "oras", _oras(layers, where)
    kinds = sorted({x.get("mediaType", "") for x in layers})
    shown = ", ".join(_show(k, quote=False) for k in kinds[:10]) + (", ..." if kinds[10:] else "")
    raise UnsupportedManifest(
        f"{where}: not a model artifact weightcache knows (config {_show(config_type)}, "
        f"artifactType {_show(artifact_type)}, layers {shown or 'none'}); accepted: "
        "ORAS artifacts with title annotations, KitOps ModelKits, CNCF ModelPack, images"
    )


def _schema_version(doc: Mapping[str, Any], where: str) -> None:
    version = doc.get("schemaVersion")
    if type(version) is not int or version != 2:
        raise UnsupportedManifest(f"{where}: schemaVersion {_show(version)}")


def _string_map(value: Any, what: str) -> None:
    """Annotations are absent or a JSON object of strings (image-spec annotations.md)."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise UnsupportedManifest(f"{what} are not an object")
    for key, v in value.items():
        if not isinstance(v, str):
            raise UnsupportedManifest(f"{what}: {_show(key)} is not a string")


def _show(value: Any, *, quote: bool = True, limit: int = 80) -> str:
    """A hostile value shortened for an error message."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _annotations(layer: Mapping[str, Any]) -> Mapping[str, str]:
    """A validated descriptor's annotations (see :func:`descriptor`)."""
    ann: Mapping[str, str] = layer.get("annotations") or {}
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
            raise UnsupportedManifest(
                f"{where}: unknown ModelKit layer media type {_show(media_type)}"
            )
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
            raise UnsupportedManifest(
                f"{where}: unknown ModelPack layer media type {_show(media_type)}"
            )
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
            raise UnsupportedManifest(
                f"{where}: unknown image layer media type {_show(media_type)}"
            )
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
