"""Bad input and failing sources: a clear error, and nothing unverified under models/."""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PART, make_config, models_dir_entries, read_tree

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.config import Config, RegistryConfig
from weightcache.daemon.errors import (
    DigestMismatch,
    SourceError,
    UnsafeContent,
    UnsupportedManifest,
    WeightcacheError,
)
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.store import Store
from weightcache.testing.faultproxy import FaultProxy, Rule
from weightcache.testing.models import (
    OCI_EMPTY,
    OCI_LAYER_TAR,
    TITLE,
    ModelPublisher,
    TarMember,
    members_for,
    sample_model,
    write_tar,
)
from weightcache.testing.oci_push import RegistryPusher

BLOBS = r"/v2/.*/blobs/sha256:"


@pytest.fixture
def make_fetcher(tmp_path: Path) -> Iterator[object]:
    made: list[Fetcher] = []

    def make(config: Config | None = None) -> Fetcher:
        config = config or make_config(tmp_path / "store")
        f = build_fetcher(config, Store(config.store))
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()
        f.store.close()


def _fails(fetcher: Fetcher, ref: str, exc: type[Exception], match: str) -> WeightcacheError:
    with pytest.raises(exc, match=match) as info:
        fetcher.warm(parse_reference(ref))
    assert models_dir_entries(fetcher.store.config.root) == []
    assert isinstance(info.value, WeightcacheError)
    return info.value


# -- hostile or unknown manifests -------------------------------------------------------------


def test_unknown_artifact_is_refused_naming_its_media_types(
    registry, pusher: RegistryPusher, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    config = pusher.push_blob("bad/unknown", b"{}", "application/vnd.example.config+json")
    layer = pusher.push_blob("bad/unknown", b"data", "application/vnd.example.weights")
    publisher.manifest("bad/unknown", "v1", config, [layer])
    _fails(
        fetcher,
        f"oci://{registry.host}/bad/unknown:v1",
        UnsupportedManifest,
        "application/vnd.example.weights",
    )


def test_unknown_modelpack_layer_type_is_named(
    registry, pusher: RegistryPusher, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    config = pusher.push_blob("bad/mp", b"{}", "application/vnd.cncf.model.config.v1+json")
    layer = pusher.push_blob("bad/mp", b"data", "application/vnd.cncf.model.weight.v1.tar+lz4")
    publisher.manifest(
        "bad/mp", "v1", config, [layer], artifact_type="application/vnd.cncf.model.manifest.v1+json"
    )
    _fails(
        fetcher, f"oci://{registry.host}/bad/mp:v1", UnsupportedManifest, r"weight\.v1\.tar\+lz4"
    )


@pytest.mark.parametrize(
    ("title", "match"),
    [
        ("../../etc/passwd", r"leaves the model tree"),
        ("/etc/passwd", "absolute path"),
        ("a/../../b", "leaves the model tree"),
        ("a\\b", "backslash"),
    ],
)
def test_oras_title_traversal_is_refused(
    registry,
    pusher: RegistryPusher,
    publisher: ModelPublisher,
    fetcher: Fetcher,
    title: str,
    match: str,
) -> None:
    config = pusher.push_blob("bad/title", b"{}", OCI_EMPTY)
    layer = pusher.push_blob("bad/title", b"evil", OCI_LAYER_TAR, {TITLE: title})
    publisher.manifest("bad/title", "v1", config, [layer])
    _fails(fetcher, f"oci://{registry.host}/bad/title:v1", UnsafeContent, match)


def test_duplicate_paths_are_refused(
    registry, pusher: RegistryPusher, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    config = pusher.push_blob("bad/dup", b"{}", OCI_EMPTY)
    a = pusher.push_blob("bad/dup", b"one", OCI_LAYER_TAR, {TITLE: "w.bin"})
    b = pusher.push_blob("bad/dup", b"two", OCI_LAYER_TAR, {TITLE: "./w.bin"})
    publisher.manifest("bad/dup", "v1", config, [a, b])
    _fails(fetcher, f"oci://{registry.host}/bad/dup:v1", UnsafeContent, "duplicate path 'w.bin'")


def test_absurd_layer_size_is_refused(
    registry, pusher: RegistryPusher, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    config = pusher.push_blob("bad/size", b"{}", OCI_EMPTY)
    layer = pusher.push_blob("bad/size", b"x", OCI_LAYER_TAR, {TITLE: "w.bin"})
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.to_json(),
        "layers": [{**layer.to_json(), "size": 1 << 60}],
    }
    pusher.push_manifest("bad/size", "v1", manifest, "application/vnd.oci.image.manifest.v1+json")
    _fails(fetcher, f"oci://{registry.host}/bad/size:v1", UnsafeContent, "absurd")


def _modelkit_with(
    publisher: ModelPublisher,
    pusher: RegistryPusher,
    repo: str,
    members: list[TarMember],
    tmp_path: Path,
) -> None:
    tar_path = tmp_path / "layer.tar"
    write_tar(tar_path, members)
    layer = pusher.push_blob(repo, tar_path, "application/vnd.kitops.modelkit.model.v1.tar")
    config = pusher.push_blob(
        repo, b'{"manifestVersion":"1.0.0"}', "application/vnd.kitops.modelkit.config.v1+json"
    )
    publisher.manifest(
        repo,
        "v1",
        config,
        [layer],
        artifact_type="application/vnd.kitops.modelkit.manifest.v1+json",
    )


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (TarMember("../evil.bin", b"x"), "leaves the model tree"),
        (TarMember("/abs/evil.bin", b"x"), "absolute path"),
        (TarMember("link", None, tarfile.SYMTYPE, "../../etc/passwd"), "symlink 'link'.*leaves"),
        (TarMember("link", None, tarfile.SYMTYPE, "/etc/passwd"), "symlink 'link'.*leaves"),
        (TarMember("hl", None, tarfile.LNKTYPE, "../outside"), "leaves the model tree"),
        (TarMember("dev", None, tarfile.CHRTYPE), "character device"),
        (TarMember("fifo", None, tarfile.FIFOTYPE), "FIFO"),
        (TarMember("dangling", None, tarfile.SYMTYPE, "nothing-here"), "names no file"),
        (TarMember("model.bin", b"second copy"), "duplicate path 'model.bin'"),
    ],
)
def test_hostile_tar_members_are_refused(
    registry,
    pusher: RegistryPusher,
    publisher: ModelPublisher,
    fetcher: Fetcher,
    tmp_path: Path,
    member: TarMember,
    match: str,
) -> None:
    repo = f"bad/tar{abs(hash((member.name, member.kind, member.linkname))) % 10**8}"
    _modelkit_with(publisher, pusher, repo, [TarMember("model.bin", b"weights"), member], tmp_path)
    _fails(fetcher, f"oci://{registry.host}/{repo}:v1", UnsafeContent, match)


def test_links_inside_the_tree_become_second_names(
    registry, pusher: RegistryPusher, publisher: ModelPublisher, fetcher: Fetcher, tmp_path: Path
) -> None:
    members = [
        *members_for({"weights/model.bin": b"weights"}),
        TarMember("latest.bin", None, tarfile.SYMTYPE, "weights/model.bin"),
        TarMember("weights/again.bin", None, tarfile.LNKTYPE, "weights/model.bin"),
        TarMember("chain.bin", None, tarfile.SYMTYPE, "latest.bin"),
    ]
    _modelkit_with(publisher, pusher, "ok/links", members, tmp_path)
    row = fetcher.warm(parse_reference(f"oci://{registry.host}/ok/links:v1"))
    tree = read_tree(fetcher.store.model_path(row.digest))
    assert tree == {
        name: b"weights"
        for name in ("weights/model.bin", "latest.bin", "weights/again.bin", "chain.bin")
    }


# -- failing transfers ------------------------------------------------------------------------


def _pushed(publisher: ModelPublisher, repo: str, seed: int = 1) -> dict[str, bytes]:
    files = sample_model(seed, shard_bytes=2 * PART + 100, shards=2)
    publisher.oras(repo, "v1", files)
    return files


def test_bytes_that_do_not_match_the_digest_are_discarded(
    proxy: FaultProxy, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    files = _pushed(publisher, "fault/flip")
    victim = hashlib.sha256(files["config.json"]).hexdigest()
    proxy.state.rules.append(Rule(rf"/blobs/sha256:{victim}", flip_at=3))
    err = _fails(
        fetcher,
        f"oci://{proxy.host}/fault/flip:v1",
        DigestMismatch,
        "config.json hashes to sha256:.*but the source announced",
    )
    assert "discarded" in str(err)
    assert not (fetcher.store.layout.staging / f"{victim}.part").exists()
    assert not fetcher.store.has_blob(f"sha256:{victim}")


def test_a_truncated_body_is_retried(
    proxy: FaultProxy, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    files = _pushed(publisher, "fault/trunc-once")
    rule = Rule(BLOBS, truncate_at=1000, times=1)
    proxy.state.rules.append(rule)
    row = fetcher.warm(parse_reference(f"oci://{proxy.host}/fault/trunc-once:v1"))
    assert rule.hits == 1
    assert read_tree(fetcher.store.model_path(row.digest)) == files


def test_a_body_always_truncated_fails_as_truncated(
    proxy: FaultProxy, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    _pushed(publisher, "fault/trunc")
    proxy.state.rules.append(Rule(BLOBS, truncate_at=1000))
    err = _fails(fetcher, f"oci://{proxy.host}/fault/trunc:v1", SourceError, "cut short")
    assert isinstance(err, SourceError) and err.reason == "truncated"


@pytest.mark.parametrize(
    ("status", "reason"), [(401, "auth"), (403, "auth"), (404, "not_found"), (400, "invalid")]
)
def test_client_errors_fail_at_once(
    proxy: FaultProxy,
    publisher: ModelPublisher,
    make_fetcher,
    tmp_path: Path,
    status: int,
    reason: str,
) -> None:
    _pushed(publisher, f"fault/s{status}")
    rule = Rule(BLOBS, status=status)
    proxy.state.rules.append(rule)
    # One request at a time, so the hit count is the attempt count.
    fetcher = make_fetcher(make_config(tmp_path / "s", files_in_parallel=1, ranges_per_file=1))
    err = _fails(fetcher, f"oci://{proxy.host}/fault/s{status}:v1", SourceError, f"HTTP {status}")
    assert isinstance(err, SourceError) and err.reason == reason and not err.retryable
    assert rule.hits == 1


def test_manifest_not_found(proxy: FaultProxy, fetcher: Fetcher) -> None:
    err = _fails(fetcher, f"oci://{proxy.host}/fault/missing:v1", SourceError, "HTTP 404")
    assert isinstance(err, SourceError) and err.reason == "not_found"


def test_429_with_retry_after_is_honoured(
    proxy: FaultProxy, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    files = _pushed(publisher, "fault/429")
    rule = Rule(BLOBS, status=429, headers={"Retry-After": "0"}, times=2)
    proxy.state.rules.append(rule)
    row = fetcher.warm(parse_reference(f"oci://{proxy.host}/fault/429:v1"))
    assert rule.hits == 2
    assert read_tree(fetcher.store.model_path(row.digest)) == files


def test_500_is_retried_then_given_up(
    proxy: FaultProxy, publisher: ModelPublisher, make_fetcher, tmp_path: Path
) -> None:
    _pushed(publisher, "fault/500")
    rule = Rule(r"/v2/fault/500/manifests/", status=500)
    proxy.state.rules.append(rule)
    fetcher = make_fetcher(make_config(tmp_path / "s", retry_delays=(0.0, 0.0)))
    err = _fails(fetcher, f"oci://{proxy.host}/fault/500:v1", SourceError, "HTTP 500")
    assert isinstance(err, SourceError) and err.reason == "server"
    assert rule.hits == 3  # the first try and two retries, as the delays say


def test_500_once_recovers(proxy: FaultProxy, publisher: ModelPublisher, fetcher: Fetcher) -> None:
    files = _pushed(publisher, "fault/500once")
    proxy.state.rules.append(Rule(BLOBS, status=500, times=1))
    row = fetcher.warm(parse_reference(f"oci://{proxy.host}/fault/500once:v1"))
    assert read_tree(fetcher.store.model_path(row.digest)) == files


# -- auth -------------------------------------------------------------------------------------


def _docker_config(path: Path, host: str, user: str, password: str) -> Path:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_private_registry_with_credentials(
    proxy: FaultProxy, publisher: ModelPublisher, make_fetcher, tmp_path: Path, scheme: str
) -> None:
    files = _pushed(publisher, f"private/{scheme}")
    proxy.state.auth = scheme
    creds = _docker_config(tmp_path / "config.json", proxy.host, "puller", "s3cret")
    fetcher = make_fetcher(
        make_config(tmp_path / "s", registry=RegistryConfig(docker_config=creds))
    )
    row = fetcher.warm(parse_reference(f"oci://{proxy.host}/private/{scheme}:v1"))
    assert read_tree(fetcher.store.model_path(row.digest)) == files


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_private_registry_without_or_with_wrong_credentials(
    proxy: FaultProxy, publisher: ModelPublisher, make_fetcher, tmp_path: Path, scheme: str
) -> None:
    _pushed(publisher, f"private/{scheme}-denied")
    proxy.state.auth = scheme
    ref = f"oci://{proxy.host}/private/{scheme}-denied:v1"
    err = _fails(make_fetcher(make_config(tmp_path / "a")), ref, SourceError, "HTTP 401")
    assert isinstance(err, SourceError) and err.reason == "auth"
    wrong = _docker_config(tmp_path / "wrong.json", proxy.host, "puller", "nope")
    fetcher = make_fetcher(
        make_config(tmp_path / "b", registry=RegistryConfig(docker_config=wrong))
    )
    err = _fails(fetcher, ref, SourceError, "HTTP 401")
    assert "nope" not in str(err) and "s3cret" not in str(err)


# -- mirrors ----------------------------------------------------------------------------------


def test_mirror_is_tried_first_and_falls_back(
    registry, proxy: FaultProxy, publisher: ModelPublisher, make_fetcher, tmp_path: Path
) -> None:
    from weightcache.daemon.config import Mirror

    files = _pushed(publisher, "mirrored/model")
    # The proxy plays a mirror of the origin; it fails one blob, which falls back to the origin.
    proxy.state.rules.append(Rule(BLOBS, status=503, times=1))
    config = make_config(
        tmp_path / "s",
        registry=RegistryConfig(mirrors={registry.host: (Mirror(url=proxy.url, resolve=True),)}),
    )
    fetcher = make_fetcher(config)
    row = fetcher.warm(parse_reference(f"oci://{registry.host}/mirrored/model:v1"))
    assert read_tree(fetcher.store.model_path(row.digest)) == files
    via_mirror = [r for r in proxy.state.requests if "/blobs/" in r[1] and r[2] == 206]
    assert via_mirror, "blobs were not fetched through the mirror"
    assert any("/manifests/v1" in r[1] for r in proxy.state.requests)
