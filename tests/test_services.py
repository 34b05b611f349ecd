"""The test services are real: bytes pushed through their HTTP APIs come back unchanged."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest
import urllib3

from weightcache.testing.oci_push import OCI_MANIFEST, Descriptor, PushError, RegistryPusher
from weightcache.testing.services import (
    REGISTRY_INSTALL,
    Registry,
    S3Endpoint,
    ServiceUnavailable,
    run_registry,
)


def test_registry_round_trip(registry: Registry, pusher: RegistryPusher) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    blob = pusher.push_blob("roundtrip/model", data, "application/octet-stream")
    assert blob.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert pusher.get_blob("roundtrip/model", blob.digest) == data

    config = pusher.push_blob("roundtrip/model", b"{}", "application/vnd.oci.empty.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [blob.to_json()],
    }
    pushed = pusher.push_manifest("roundtrip/model", "v1", manifest, OCI_MANIFEST)
    body, content_type = pusher.get_manifest("roundtrip/model", "v1")
    assert content_type == OCI_MANIFEST
    assert "sha256:" + hashlib.sha256(body).hexdigest() == pushed.digest
    by_digest, _ = pusher.get_manifest("roundtrip/model", pushed.digest)
    assert by_digest == body


def test_registry_serves_ranges(registry: Registry, pusher: RegistryPusher) -> None:
    data = os.urandom(100_000)
    blob = pusher.push_blob("roundtrip/ranges", data, "application/octet-stream")
    http = urllib3.PoolManager()
    resp = http.request(
        "GET",
        f"{registry.url}/v2/roundtrip/ranges/blobs/{blob.digest}",
        headers={"Range": "bytes=1000-1999"},
    )
    assert resp.status == 206
    assert resp.data == data[1000:2000]


def test_registry_rejects_a_wrong_digest(registry: Registry) -> None:
    pusher = RegistryPusher(registry.url)
    with pytest.raises(PushError, match="HTTP 404"):
        pusher.get_blob("roundtrip/model", "sha256:" + "0" * 64)


def test_registry_without_binary_fails_with_install_command(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceUnavailable) as exc, run_registry(tmp_path):
        pass
    assert REGISTRY_INSTALL in str(exc.value)


def test_s3_round_trip(s3: S3Endpoint) -> None:
    client = s3.client()
    bucket = f"roundtrip-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    data = os.urandom(2 * 1024 * 1024 + 3)
    client.put_object(Bucket=bucket, Key="models/m/weights.bin", Body=data)
    got = client.get_object(Bucket=bucket, Key="models/m/weights.bin")["Body"].read()
    assert got == data
    ranged = client.get_object(Bucket=bucket, Key="models/m/weights.bin", Range="bytes=10-19")
    assert ranged["Body"].read() == data[10:20]


def test_descriptor_json_shape() -> None:
    d = Descriptor("a/b", "sha256:" + "1" * 64, 3, {"k": "v"})
    assert d.to_json() == {
        "mediaType": "a/b",
        "digest": "sha256:" + "1" * 64,
        "size": 3,
        "annotations": {"k": "v"},
    }
