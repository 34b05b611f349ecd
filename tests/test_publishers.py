"""The model publishers put each format into the real registry and S3 endpoint, byte-exact."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest
import zstandard

from weightcache.testing.models import (
    KIT_ARTIFACT,
    KIT_CONFIG,
    MODELPACK_ARTIFACT,
    MODELPACK_CONFIG,
    MODELPACK_FILEPATH,
    OCI_EMPTY,
    TITLE,
    ModelPublisher,
    publish_s3,
    sample_model,
)
from weightcache.testing.oci_push import RegistryPusher
from weightcache.testing.services import S3Endpoint


def _manifest(pusher: RegistryPusher, repo: str, ref: str) -> dict:
    body, _ = pusher.get_manifest(repo, ref)
    return json.loads(body)


def _untar(blob: bytes, media_type: str) -> dict[str, bytes]:
    if media_type.endswith("+gzip"):
        blob = gzip.decompress(blob)
    elif media_type.endswith("+zstd"):
        blob = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)).read()
    out = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        for member in tar.getmembers():
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                out[member.name] = f.read()
    return out


def test_oras_artifact(pusher: RegistryPusher, publisher: ModelPublisher) -> None:
    files = sample_model(1)
    desc = publisher.oras("fmt/oras", "v1", files)
    m = _manifest(pusher, "fmt/oras", desc.digest)
    assert m["config"]["mediaType"] == OCI_EMPTY
    got = {
        layer["annotations"][TITLE]: pusher.get_blob("fmt/oras", layer["digest"])
        for layer in m["layers"]
    }
    assert got == files


def test_kitops_modelkit(pusher: RegistryPusher, publisher: ModelPublisher) -> None:
    files = sample_model(2)
    desc = publisher.modelkit("fmt/kit", "v1", files, compression="gzip")
    m = _manifest(pusher, "fmt/kit", desc.digest)
    assert "mediaType" not in m  # as kit writes it
    assert m["artifactType"] == KIT_ARTIFACT
    assert m["config"]["mediaType"] == KIT_CONFIG
    kitfile = json.loads(pusher.get_blob("fmt/kit", m["config"]["digest"]))
    assert kitfile["model"]["path"].endswith(".safetensors")
    got: dict[str, bytes] = {}
    for layer in m["layers"]:
        assert layer["mediaType"].startswith("application/vnd.kitops.modelkit.")
        assert layer["mediaType"].endswith(".v1.tar+gzip")
        got.update(_untar(pusher.get_blob("fmt/kit", layer["digest"]), layer["mediaType"]))
    assert got == files


@pytest.mark.parametrize("layer_format", ["raw", "tar", "tar+gzip", "tar+zstd"])
def test_modelpack(pusher: RegistryPusher, publisher: ModelPublisher, layer_format: str) -> None:
    files = sample_model(3)
    desc = publisher.modelpack("fmt/modelpack", layer_format.replace("+", "-"), files, layer_format)  # type: ignore[arg-type]
    m = _manifest(pusher, "fmt/modelpack", desc.digest)
    assert m["artifactType"] == MODELPACK_ARTIFACT
    assert m["config"]["mediaType"] == MODELPACK_CONFIG
    got: dict[str, bytes] = {}
    kinds = set()
    for layer in m["layers"]:
        assert layer["mediaType"].endswith(f".v1.{layer_format}")
        kinds.add(layer["mediaType"].removeprefix("application/vnd.cncf.model.").split(".v1.")[0])
        blob = pusher.get_blob("fmt/modelpack", layer["digest"])
        if layer_format == "raw":
            got[layer["annotations"][MODELPACK_FILEPATH]] = blob
        else:
            got.update(_untar(blob, layer["mediaType"]))
    assert got == files
    assert {"weight", "doc"} <= kinds


def test_modelcar_image(pusher: RegistryPusher, publisher: ModelPublisher) -> None:
    files = sample_model(4)
    desc = publisher.image("fmt/image", "v1", files)
    m = _manifest(pusher, "fmt/image", desc.digest)
    (layer,) = m["layers"]
    got = _untar(pusher.get_blob("fmt/image", layer["digest"]), layer["mediaType"])
    assert got == {f"models/{k}": v for k, v in files.items()}


def test_index_with_platforms(pusher: RegistryPusher, publisher: ModelPublisher) -> None:
    a = publisher.oras("fmt/index", "a", sample_model(5))
    idx = publisher.index("fmt/index", "multi", [(a, None), (a, {"os": "linux"})])
    m = _manifest(pusher, "fmt/index", idx.digest)
    assert [e["digest"] for e in m["manifests"]] == [a.digest, a.digest]
    assert "platform" not in m["manifests"][0]


def test_s3_prefix(s3: S3Endpoint) -> None:
    files = sample_model(6)
    client = s3.client()
    publish_s3(client, "publish-models", "team/llm/v1/", files)
    listed = client.list_objects_v2(Bucket="publish-models", Prefix="team/llm/v1/")["Contents"]
    bucket = "publish-models"
    got = {
        o["Key"].removeprefix("team/llm/v1/"): client.get_object(Bucket=bucket, Key=o["Key"])[
            "Body"
        ].read()
        for o in listed
    }
    assert got == files
