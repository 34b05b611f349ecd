"""Every accepted format fetched from the real registry, S3 endpoint and local directories."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import PART, read_tree, tree_modes

from weightcache.daemon.errors import UnsupportedManifest
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.references import parse_reference
from weightcache.testing.models import ModelPublisher, publish_s3, sample_model, write_files
from weightcache.testing.services import Registry, S3Endpoint


def _warm(fetcher: Fetcher, ref: str) -> Path:
    row = fetcher.warm(parse_reference(ref))
    assert row.state == "ready"
    return fetcher.store.model_path(row.digest)


def _multi_chunk_model(seed: int) -> dict[str, bytes]:
    files = sample_model(seed, shard_bytes=3 * PART + 12345, shards=2)
    files["empty.txt"] = b""
    return files


def test_oras_by_tag_resolves_to_the_manifest_digest(
    registry: Registry, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    files = _multi_chunk_model(10)
    desc = publisher.oras("models/oras", "v1", files)
    row = fetcher.warm(parse_reference(f"oci://{registry.host}/models/oras:v1"))
    assert row.digest == desc.digest
    tree = fetcher.store.model_path(row.digest)
    assert read_tree(tree) == files
    assert tree_modes(tree) == {("dir", 0o555), ("file", 0o444)}
    assert row.size == sum(len(v) for v in files.values())


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_kitops_modelkit(
    registry: Registry, publisher: ModelPublisher, fetcher: Fetcher, compression: str
) -> None:
    files = _multi_chunk_model(11)
    desc = publisher.modelkit("models/kit", compression, files, compression)  # type: ignore[arg-type]
    tree = _warm(fetcher, f"oci://{registry.host}/models/kit@{desc.digest}")
    assert read_tree(tree) == files


@pytest.mark.parametrize("layer_format", ["raw", "tar", "tar+gzip", "tar+zstd"])
def test_modelpack(
    registry: Registry, publisher: ModelPublisher, fetcher: Fetcher, layer_format: str
) -> None:
    files = _multi_chunk_model(12)
    tag = layer_format.replace("+", "-")
    publisher.modelpack("models/pack", tag, files, layer_format)  # type: ignore[arg-type]
    tree = _warm(fetcher, f"oci://{registry.host}/models/pack:{tag}")
    assert read_tree(tree) == files


def test_modelcar_image_takes_the_models_directory(
    registry: Registry, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    files = _multi_chunk_model(13)
    publisher.image("models/car", "v1", files)
    tree = _warm(fetcher, f"oci://{registry.host}/models/car:v1")
    assert read_tree(tree) == files


def test_index_picks_the_platform_free_manifest(
    registry: Registry, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    files = sample_model(14)
    model = publisher.oras("models/idx", "model", files)
    other = publisher.oras("models/idx", "other", sample_model(15))
    publisher.index(
        "models/idx", "multi", [(other, {"os": "linux", "architecture": "amd64"}), (model, None)]
    )
    row = fetcher.warm(parse_reference(f"oci://{registry.host}/models/idx:multi"))
    assert row.digest == model.digest
    assert read_tree(fetcher.store.model_path(row.digest)) == files


def test_index_of_platform_manifests_fails_clearly(
    registry: Registry, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    a = publisher.oras("models/idx2", "a", sample_model(16))
    publisher.index("models/idx2", "plat", [(a, {"os": "linux", "architecture": "arm64"})])
    with pytest.raises(UnsupportedManifest, match=r"only platform-specific.*linux/arm64"):
        fetcher.warm(parse_reference(f"oci://{registry.host}/models/idx2:plat"))


def test_identical_files_are_stored_once(
    registry: Registry, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    shared = sample_model(17)
    v1 = publisher.oras("models/dedupe", "v1", shared)
    v2 = publisher.modelpack("models/dedupe", "v2", {**shared, "extra.bin": b"x" * 100})
    t1 = _warm(fetcher, f"oci://{registry.host}/models/dedupe@{v1.digest}")
    t2 = _warm(fetcher, f"oci://{registry.host}/models/dedupe@{v2.digest}")
    for name in shared:
        assert (t1 / name).stat().st_ino == (t2 / name).stat().st_ino
    blobs = {r[0] for r in fetcher.store.index.query("SELECT sha256 FROM blobs")}
    expected = {"sha256:" + hashlib.sha256(v).hexdigest() for v in shared.values()}
    assert blobs == expected | {"sha256:" + hashlib.sha256(b"x" * 100).hexdigest()}


def test_s3_prefix(s3: S3Endpoint, tmp_path: Path) -> None:
    from helpers import make_config

    from weightcache.daemon.sources import Sources
    from weightcache.daemon.sources.s3 import S3Source
    from weightcache.daemon.store.store import Store

    files = _multi_chunk_model(18)
    publish_s3(s3.client(), "models", "team/llm/v1/", files)
    publish_s3(s3.client(), "models", "team/llm/v10/", {"other.bin": b"not this model"})
    config = make_config(tmp_path / "store")
    fetcher = Fetcher(Store(config.store), Sources({"s3": S3Source(s3.client)}), config.fetch)
    try:
        tree = _warm(fetcher, "s3://models/team/llm/v1")
        assert read_tree(tree) == files
    finally:
        fetcher.close()
        fetcher.store.close()


def test_local_directory(tmp_path: Path, fetcher: Fetcher) -> None:
    files = _multi_chunk_model(19)
    src = write_files(tmp_path / "src", files)
    (src / "alias.safetensors").symlink_to("model-00001-of-00002.safetensors")
    tree = _warm(fetcher, f"file://{src}")
    got = read_tree(tree)
    assert got.pop("alias.safetensors") == files["model-00001-of-00002.safetensors"]
    assert got == files


def test_s3_prefix_listing_spans_pages(s3: S3Endpoint, tmp_path: Path) -> None:
    from weightcache.daemon.sources.s3 import S3Source

    files = {f"shard/{i:04d}.bin": i.to_bytes(2, "big") for i in range(1105)}
    client = s3.client()
    client.create_bucket(Bucket="paged")
    for key, body in files.items():
        client.put_object(Bucket="paged", Key=f"big/{key}", Body=body)
    plan = S3Source(s3.client).resolve(parse_reference("s3://paged/big/"))
    assert sorted(i.path for i in plan.items) == sorted(files)  # type: ignore[union-attr]
    assert plan.total_bytes == 2 * len(files)
