"""Publish test models into a real registry or S3 endpoint, in the formats users push.

- ORAS artifacts (``oras push``): one raw-file layer per file, path in the title annotation.
- KitOps ModelKits (``kit pack``): Kitfile as config, one tar layer per Kitfile entry.
- CNCF ModelPack artifacts (``modctl build``): raw, tar, tar+gzip or tar+zstd layers.
- Plain images (modelcar style): one tar+gzip layer carrying the model directory.
- S3 prefixes: one object per file.

The media types and annotations follow the published specifications; the tar writer can also
build hostile layers (traversal, links, devices) for the bad-input tests.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import zstandard

from weightcache.daemon.hashing import sha256_stream
from weightcache.daemon.store.tarsafe import open_decompressed
from weightcache.testing.oci_push import OCI_INDEX, OCI_MANIFEST, Descriptor, RegistryPusher

ModelFiles = Mapping[str, bytes | Path]
"""A model: relative POSIX path -> content (bytes, or a file streamed from disk)."""

Compression = Literal["none", "gzip", "zstd"]

OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TITLE = "org.opencontainers.image.title"
ORAS_ARTIFACT = "application/vnd.unknown.artifact.v1"

KIT_CONFIG = "application/vnd.kitops.modelkit.config.v1+json"
KIT_ARTIFACT = "application/vnd.kitops.modelkit.manifest.v1+json"

MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_FILEPATH = "org.cncf.model.filepath"
ModelPackFormat = Literal["raw", "tar", "tar+gzip", "tar+zstd"]

_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".h5"}
_COPY_CHUNK = 1 << 22


@dataclass(frozen=True)
class TarMember:
    """One tar entry. ``kind`` is a tarfile type flag (REGTYPE, DIRTYPE, SYMTYPE, LNKTYPE, ...)."""

    name: str
    data: bytes | Path | None = None
    kind: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644


def members_for(files: ModelFiles, under: str = "") -> list[TarMember]:
    """Tar members for ``files`` (under an optional directory), parents first, sorted."""
    dirs: set[str] = set()
    regular: list[TarMember] = []
    for rel, content in files.items():
        path = PurePosixPath(under, rel) if under else PurePosixPath(rel)
        for parent in reversed(path.parents[:-1]):
            dirs.add(str(parent))
        regular.append(TarMember(str(path), content))
    out = [TarMember(d, None, tarfile.DIRTYPE, mode=0o755) for d in sorted(dirs)]
    return out + sorted(regular, key=lambda m: m.name)


def write_tar(dest: Path, members: Iterable[TarMember], compression: Compression = "none") -> None:
    """Write a reproducible tar (zeroed times and owners), optionally compressed."""
    with dest.open("wb") as raw:
        _write_compressed(raw, members, compression)


def tar_bytes(members: Iterable[TarMember], compression: Compression = "none") -> bytes:
    """The bytes :func:`write_tar` would write, in memory (for tests of the unpacker)."""
    out = io.BytesIO()
    _write_compressed(out, members, compression)
    return out.getvalue()


def _write_compressed(
    raw: IO[bytes], members: Iterable[TarMember], compression: Compression
) -> None:
    if compression == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
            _write_tar_stream(gz, members)
    elif compression == "zstd":
        with zstandard.ZstdCompressor(level=1).stream_writer(raw, closefd=False) as zw:
            _write_tar_stream(zw, members)
    else:
        _write_tar_stream(raw, members)


def _write_tar_stream(out: Any, members: Iterable[TarMember]) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.mode = m.mode
            info.mtime = 0
            info.linkname = m.linkname
            if m.kind == tarfile.REGTYPE and m.data is not None:
                if isinstance(m.data, Path):
                    info.size = m.data.stat().st_size
                    with m.data.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    info.size = len(m.data)
                    tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)


def _sha256_of(path: Path, decompress: Compression = "none") -> str:
    with path.open("rb") as f:
        return sha256_stream(open_decompressed(f, decompress))[0]


@dataclass
class ModelPublisher:
    """Pushes models into one registry in each supported format; returns the manifest descriptor."""

    pusher: RegistryPusher
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="wc-publish-")))

    def _tar_blob(
        self,
        repo: str,
        members: Iterable[TarMember],
        media_type: str,
        compression: Compression,
        annotations: Mapping[str, str] | None = None,
    ) -> tuple[Descriptor, str]:
        """Push a tar layer; return its descriptor and the digest of the uncompressed tar."""
        with tempfile.NamedTemporaryFile(dir=self.workdir, suffix=".tar") as tmp:
            path = Path(tmp.name)
            write_tar(path, members, compression)
            desc = self.pusher.push_blob(repo, path, media_type, annotations)
            diff_id = _sha256_of(path, compression) if compression != "none" else desc.digest
        return desc, diff_id

    def manifest(
        self,
        repo: str,
        tag: str,
        config: Descriptor,
        layers: Sequence[Descriptor],
        *,
        artifact_type: str | None = None,
        annotations: Mapping[str, str] | None = None,
        include_media_type: bool = True,
    ) -> Descriptor:
        """Push an image manifest assembled from already pushed blobs."""
        body: dict[str, Any] = {"schemaVersion": 2}
        if include_media_type:
            body["mediaType"] = OCI_MANIFEST
        if artifact_type:
            body["artifactType"] = artifact_type
        body["config"] = config.to_json()
        body["layers"] = [layer.to_json() for layer in layers]
        if annotations:
            body["annotations"] = dict(annotations)
        return self.pusher.push_manifest(repo, tag, body, OCI_MANIFEST)

    def index(
        self, repo: str, tag: str, entries: Sequence[tuple[Descriptor, Mapping[str, str] | None]]
    ) -> Descriptor:
        """Push an image index; each entry is a manifest descriptor and an optional platform."""
        manifests = []
        for desc, platform in entries:
            item = desc.to_json()
            if platform:
                item["platform"] = dict(platform)
            manifests.append(item)
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.pusher.push_manifest(repo, tag, body, OCI_INDEX)

    def oras(
        self, repo: str, tag: str, files: ModelFiles, artifact_type: str = ORAS_ARTIFACT
    ) -> Descriptor:
        """Like ``oras push``: raw file blobs typed as tar layers, paths in the title."""
        config = self.pusher.push_blob(repo, b"{}", OCI_EMPTY)
        layers = [
            self.pusher.push_blob(repo, content, OCI_LAYER_TAR, {TITLE: rel})
            for rel, content in sorted(files.items())
        ]
        return self.manifest(repo, tag, config, layers, artifact_type=artifact_type)

    def modelkit(
        self, repo: str, tag: str, files: ModelFiles, compression: Compression = "none"
    ) -> Descriptor:
        """Like ``kit pack && kit push``: the Kitfile as config; model, parts and docs as tars."""
        suffix = {"none": "", "gzip": "+gzip", "zstd": "+zstd"}[compression]
        ordered = sorted(files, key=lambda p: (PurePosixPath(p).suffix not in _WEIGHT_SUFFIXES, p))
        kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "package": {"name": repo}}
        layers: list[Descriptor] = []
        parts: list[dict[str, Any]] = []
        docs: list[dict[str, Any]] = []
        for i, rel in enumerate(ordered):
            is_doc = PurePosixPath(rel).suffix == ".md"
            base = "docs" if is_doc else ("model" if i == 0 else "modelpart")
            media_type = f"application/vnd.kitops.modelkit.{base}.v1.tar{suffix}"
            desc, diff_id = self._tar_blob(
                repo,
                members_for({rel: files[rel]}),
                media_type,
                compression,
                {MODELPACK_FILEPATH: rel},
            )
            layers.append(desc)
            entry = {"path": rel, "digest": desc.digest, "diffId": diff_id}
            if base == "model":
                kitfile["model"] = {"name": repo, **entry}
            elif base == "modelpart":
                parts.append(entry)
            else:
                docs.append(entry)
        if parts:
            kitfile.setdefault("model", {"name": repo})["parts"] = parts
        if docs:
            kitfile["docs"] = docs
        config = self.pusher.push_blob(repo, json.dumps(kitfile).encode(), KIT_CONFIG)
        return self.manifest(
            repo,
            tag,
            config,
            layers,
            artifact_type=KIT_ARTIFACT,
            annotations={"ml.kitops.modelkit.cli-version": "weightcache-testing"},
            include_media_type=False,
        )

    def modelpack(
        self, repo: str, tag: str, files: ModelFiles, layer_format: ModelPackFormat = "raw"
    ) -> Descriptor:
        """Like ``modctl build``: one layer per file, typed by kind, path in the filepath key."""
        compression: Compression = {"tar+gzip": "gzip", "tar+zstd": "zstd"}.get(
            layer_format, "none"
        )  # type: ignore[assignment]
        layers: list[Descriptor] = []
        diff_ids: list[str] = []
        for rel, content in sorted(files.items()):
            media_type = f"application/vnd.cncf.model.{_modelpack_kind(rel)}.v1.{layer_format}"
            annotations = {MODELPACK_FILEPATH: rel}
            if layer_format == "raw":
                desc = self.pusher.push_blob(repo, content, media_type, annotations)
                diff_id = desc.digest
            else:
                desc, diff_id = self._tar_blob(
                    repo, members_for({rel: content}), media_type, compression, annotations
                )
            layers.append(desc)
            diff_ids.append(diff_id)
        config_body = {
            "descriptor": {"name": repo, "version": tag},
            "config": {"format": "safetensors"},
            "modelfs": {"type": "layers", "diffIds": diff_ids},
        }
        config = self.pusher.push_blob(repo, json.dumps(config_body).encode(), MODELPACK_CONFIG)
        return self.manifest(repo, tag, config, layers, artifact_type=MODELPACK_ARTIFACT)

    def image(
        self,
        repo: str,
        tag: str,
        files: ModelFiles,
        root: str = "models",
        compression: Compression = "gzip",
    ) -> Descriptor:
        """A plain image whose layer carries the model under ``root/`` (modelcar style)."""
        return self.image_layers(repo, tag, [members_for(files, under=root)], compression)

    def image_layers(
        self,
        repo: str,
        tag: str,
        layers: Sequence[Iterable[TarMember]],
        compression: Compression = "gzip",
    ) -> Descriptor:
        """An image of several layers, applied in order: whiteouts (``.wh.`` members) and
        replacements are whatever the members say, hostile ones included."""
        media_type = {
            "gzip": OCI_LAYER_TAR_GZIP,
            "zstd": OCI_LAYER_TAR_ZSTD,
            "none": OCI_LAYER_TAR,
        }[compression]
        descs: list[Descriptor] = []
        diff_ids: list[str] = []
        for members in layers:
            layer, diff_id = self._tar_blob(repo, members, media_type, compression)
            descs.append(layer)
            diff_ids.append(diff_id)
        config_body = {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config = self.pusher.push_blob(repo, json.dumps(config_body).encode(), OCI_IMAGE_CONFIG)
        return self.manifest(repo, tag, config, descs)

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _modelpack_kind(rel: str) -> str:
    suffix = PurePosixPath(rel).suffix
    if suffix in _WEIGHT_SUFFIXES:
        return "weight"
    if suffix == ".json":
        return "weight.config"
    if suffix == ".md":
        return "doc"
    if suffix == ".py":
        return "code"
    return "weight"


def publish_s3(client: Any, bucket: str, prefix: str, files: ModelFiles) -> None:
    """Create ``bucket`` if needed and put every file under ``prefix``."""
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    for rel, content in files.items():
        key = f"{prefix}{rel}"
        if isinstance(content, Path):
            client.upload_file(str(content), bucket, key)
        else:
            client.put_object(Bucket=bucket, Key=key, Body=content)


def write_files(root: Path, files: ModelFiles) -> Path:
    """Materialise a model as a directory (for ``file://`` sources); returns ``root``."""
    for rel, content in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    return root


def sample_model(seed: int = 0, shard_bytes: int = 256 * 1024, shards: int = 3) -> dict[str, bytes]:
    """A small deterministic model: shards, a config and a README, one in a subdirectory."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(shards):
        files[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = rng.randbytes(shard_bytes)
    files["config.json"] = json.dumps({"seed": seed, "shards": shards}).encode()
    files["tokenizer/tokenizer.json"] = json.dumps({"vocab": ["a", "b", str(seed)]}).encode()
    files["README.md"] = f"# test model {seed}\n".encode()
    return files
