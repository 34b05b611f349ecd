"""Hostile registries and object stores: credentials stay with their host, every read is bounded,
every byte is checked. Real servers throughout: the registry behind the fault-injecting proxy
(plain or TLS with a CA made here), moto behind the same proxy, and small recording servers
(``weightcache.testing.hostile``) for foreign realms, CDNs and refusing S3 endpoints."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from helpers import PART, make_config, models_dir_entries, read_tree

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.config import Config, Mirror, PolicyConfig, RegistryConfig
from weightcache.daemon.errors import (
    DigestMismatch,
    PolicyDenied,
    SourceError,
    UnsafeContent,
    WeightcacheError,
)
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.references import OciRef, parse_reference
from weightcache.daemon.sources import Sources
from weightcache.daemon.sources.oci import OciSource
from weightcache.daemon.sources.oci_access import RegistryAccess
from weightcache.daemon.sources.oci_http import Credentials, RegistryHTTP, load_docker_config
from weightcache.daemon.sources.ranges import Limits
from weightcache.daemon.sources.s3 import S3Source, integrity
from weightcache.daemon.store.states import ModelState
from weightcache.daemon.store.store import Store
from weightcache.testing.faultproxy import FaultProxy, Rule, run_fault_proxy
from weightcache.testing.hostile import Answer, challenge, huge_token, run_hostile, s3_error
from weightcache.testing.models import ModelPublisher, publish_s3, sample_model
from weightcache.testing.services import Registry, S3Endpoint
from weightcache.testing.tls import ServerCert, make_server_cert

BLOBS = r"/v2/.*/blobs/sha256:"
MiB = 1024 * 1024

Make = Callable[..., Fetcher]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    """Fetchers whose sources take every limit from the config (stall, deadline, CA file)."""
    made: list[Fetcher] = []
    count = [0]

    def build(config: Config | None = None, s3_client: Any = None, **fetch: object) -> Fetcher:
        count[0] += 1
        config = config or make_config(tmp_path / f"store{count[0]}", **fetch)
        limits = Limits.of(config.fetch)
        http = RegistryHTTP(
            config.registry,
            load_docker_config(config.registry.docker_config),
            config.fetch.timeout_s,
            limits=limits,
        )
        by_scheme: dict[str, Any] = {"oci": OciSource(http)}
        if s3_client is not None:
            by_scheme["s3"] = S3Source(lambda: s3_client, limits=limits)
        f = Fetcher(Store(config.store), Sources(by_scheme), config.fetch)
        made.append(f)
        return f

    yield build
    for f in made:
        f.close()
        f.store.close()


@pytest.fixture
def cert(tmp_path: Path) -> ServerCert:
    return make_server_cert(tmp_path / "tls")


def _fails(fetcher: Fetcher, ref: str, exc: type[Exception], match: str) -> WeightcacheError:
    with pytest.raises(exc, match=match) as info:
        fetcher.warm(parse_reference(ref))
    assert models_dir_entries(fetcher.store.config.root) == []
    assert isinstance(info.value, WeightcacheError)
    return info.value


def _pushed(publisher: ModelPublisher, repo: str, seed: int = 1) -> dict[str, bytes]:
    files = sample_model(seed, shard_bytes=2 * PART + 100, shards=2)
    publisher.oras(repo, "v1", files)
    return files


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _docker_config(path: Path, entries: dict[str, tuple[str, str]]) -> Path:
    auths = {
        host: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()}
        for host, (u, p) in entries.items()
    }
    path.write_text(json.dumps({"auths": auths}))
    return path


def _reset_peak_rss() -> int:
    """Reset the process's peak resident set (Linux clear_refs) and return the current one."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/self/status")


# -- 1. credentials stay with their host ------------------------------------------------------


@pytest.mark.parametrize("mirror_has_credentials", [False, True])
def test_a_mirror_challenge_never_receives_the_origin_credentials(
    registry: Registry,
    proxy: FaultProxy,
    publisher: ModelPublisher,
    make: Make,
    tmp_path: Path,
    mirror_has_credentials: bool,
) -> None:
    """The mirror names a token realm on a third host over plain http (loopback, so allowed):
    the realm sees the mirror's own credentials or none, never the origin's."""
    files = _pushed(publisher, f"creds/mirror{int(mirror_has_credentials)}")
    entries = {registry.host: ("origin-user", "origin-pass")}
    if mirror_has_credentials:
        entries[proxy.host] = ("mirror-user", "mirror-pass")
    with run_hostile(lambda seen: Answer(401, {}, b"{}")) as realm:
        proxy.state.auth = "bearer"
        proxy.state.realm = f"{realm.url}/token"
        config = make_config(
            tmp_path / "s",
            registry=RegistryConfig(
                mirrors={registry.host: (Mirror(url=proxy.url, resolve=True),)},
                docker_config=_docker_config(tmp_path / "config.json", entries),
            ),
        )
        fetcher = make(config)
        row = fetcher.warm(
            parse_reference(f"oci://{registry.host}/creds/mirror{int(mirror_has_credentials)}:v1")
        )
        assert read_tree(fetcher.store.model_path(row.digest)) == files  # from the origin
        seen = set(realm.authorizations())
    assert seen, "the mirror's realm was never asked"
    expected = _basic("mirror-user", "mirror-pass") if mirror_has_credentials else ""
    assert seen == {expected}
    assert all("origin" not in base64.b64decode(a[6:] or b"").decode() for a in seen if a)
    assert {a for _, a in proxy.state.seen_auth} == {""}


def test_an_https_mirror_naming_a_plain_http_realm_is_refused(
    registry: Registry, publisher: ModelPublisher, make: Make, tmp_path: Path, cert: ServerCert
) -> None:
    """TLS mirror, realm on http: the realm is never contacted, the fetch falls back to the
    origin. The same mirror with its own https realm is used (TLS and the CA file work)."""
    files = _pushed(publisher, "creds/tls-realm")
    ref = parse_reference(f"oci://{registry.host}/creds/tls-realm:v1")
    with (
        run_fault_proxy(registry.url, tls=cert) as mirror,
        run_hostile(lambda seen: Answer(200, {}, b'{"token": "t"}')) as realm,
    ):
        mirror.state.auth = "bearer"
        mirror.state.realm = f"{realm.url}/token"
        registry_config = RegistryConfig(
            mirrors={registry.host: (Mirror(url=mirror.url, resolve=True),)},
            docker_config=_docker_config(
                tmp_path / "config.json", {mirror.host: ("puller", "s3cret")}
            ),
            ca_file=cert.ca,
        )
        fetcher = make(make_config(tmp_path / "a", registry=registry_config))
        row = fetcher.warm(ref)
        assert read_tree(fetcher.store.model_path(row.digest)) == files
        assert realm.seen == []
        assert mirror.state.seen_auth, "the TLS mirror was never reached"

        mirror.state.realm = ""  # its own realm, https on the same host
        mirror.state.requests.clear()
        fetcher = make(make_config(tmp_path / "b", registry=registry_config))
        row = fetcher.warm(ref)
        assert read_tree(fetcher.store.model_path(row.digest)) == files
        assert any("/blobs/" in path and status == 206 for _, path, status in mirror.state.requests)


def test_a_plain_http_realm_is_used_only_for_registries_configured_insecure() -> None:
    """Unit level against a real realm server: a non-loopback registry name cannot be served
    here, so the origin is addressed but only its challenge is answered."""
    with run_hostile(lambda seen: Answer(200, {}, b'{"token": "t0k"}')) as realm:
        creds = {"registry.example": Credentials("u", "p")}
        ref = parse_reference("oci://registry.example/m:v1")
        assert isinstance(ref, OciRef)
        challenge_text = f'Bearer realm="{realm.url}/token",service="s"'
        secure = RegistryHTTP(RegistryConfig(), creds, 5)
        origin = secure.endpoints(ref, resolving=False)[-1]
        assert origin.base == "https://registry.example"
        with pytest.raises(SourceError, match="plain http") as info:
            secure.authorization(ref, origin, challenge_text)
        assert info.value.reason == "auth"
        assert realm.seen == []
        insecure = RegistryHTTP(RegistryConfig(insecure=("registry.example",)), creds, 5)
        origin = insecure.endpoints(ref, resolving=False)[-1]
        assert insecure.authorization(ref, origin, challenge_text) == "Bearer t0k"
        assert realm.authorizations() == [_basic("u", "p")]


@pytest.mark.parametrize("what", ["blobs", "manifests"])
def test_a_cdn_challenge_is_never_answered_with_the_origin_credentials(
    proxy: FaultProxy, publisher: ModelPublisher, make: Make, tmp_path: Path, what: str
) -> None:
    _pushed(publisher, f"creds/cdn-{what}")
    with run_hostile(challenge("http://127.0.0.1:9/token")) as cdn:
        proxy.state.auth = "bearer"
        proxy.state.rules.append(Rule(rf"/v2/.*/{what}/", redirect=cdn.url))
        docker = _docker_config(tmp_path / "config.json", {proxy.host: ("puller", "s3cret")})
        fetcher = make(make_config(tmp_path / "s", registry=RegistryConfig(docker_config=docker)))
        err = _fails(
            fetcher,
            f"oci://{proxy.host}/creds/cdn-{what}:v1",
            SourceError,
            "never sent to another host",
        )
        assert isinstance(err, SourceError) and err.reason == "auth" and not err.retryable
        assert cdn.seen and set(cdn.authorizations()) == {""}
    # The origin did use its credentials: a token was sent to it, and only to it.
    assert any(a.startswith("Bearer ") for _, a in proxy.state.seen_auth)


def test_a_token_never_follows_a_redirect_from_https_to_http(
    registry: Registry,
    proxy: FaultProxy,
    publisher: ModelPublisher,
    make: Make,
    tmp_path: Path,
    cert: ServerCert,
) -> None:
    """The TLS mirror wants a token and redirects blobs to plain http on the same host (the
    plain proxy): the bytes come, the token does not go."""
    files = _pushed(publisher, "creds/downgrade")
    with run_fault_proxy(registry.url, tls=cert) as secure:
        secure.state.auth = "bearer"
        secure.state.rules.append(Rule(BLOBS, redirect=proxy.url))
        config = make_config(
            tmp_path / "s",
            registry=RegistryConfig(
                mirrors={registry.host: (Mirror(url=secure.url, resolve=True),)},
                docker_config=_docker_config(
                    tmp_path / "config.json", {secure.host: ("puller", "s3cret")}
                ),
                ca_file=cert.ca,
            ),
        )
        fetcher = make(config)
        row = fetcher.warm(parse_reference(f"oci://{registry.host}/creds/downgrade:v1"))
        assert read_tree(fetcher.store.model_path(row.digest)) == files
        assert any(a.startswith("Bearer ") for p, a in secure.state.seen_auth if "/blobs/" in p)
    plain = [a for p, a in proxy.state.seen_auth if "/blobs/" in p]
    assert plain and set(plain) == {""}


def test_the_pull_secret_check_never_answers_a_redirect_target(
    proxy: FaultProxy, publisher: ModelPublisher
) -> None:
    _pushed(publisher, "creds/access")
    with run_hostile(challenge("http://127.0.0.1:9/token")) as cdn:
        proxy.state.auth = "basic"
        proxy.state.rules.append(Rule(r"/manifests/", method="HEAD", redirect=cdn.url))
        access = RegistryAccess(RegistryConfig(), timeout_s=5)
        ref = parse_reference(f"oci://{proxy.host}/creds/access:v1")
        assert isinstance(ref, OciRef)
        with pytest.raises(PolicyDenied, match="never sent to another host"):
            access.check(ref, "v1", {"username": "puller", "password": "s3cret"})
        assert cdn.seen and set(cdn.authorizations()) == {""}
    assert _basic("puller", "s3cret") in {a for _, a in proxy.state.seen_auth}


# -- 2. every read is bounded -----------------------------------------------------------------


def test_a_huge_or_endless_error_body_is_not_read(
    proxy: FaultProxy, publisher: ModelPublisher, make: Make, tmp_path: Path
) -> None:
    """A 256 MiB 404 on the manifest and an endless 500 on every blob: resident memory stays
    within a few MiB of where it was."""
    _pushed(publisher, "bounded/errors")
    fetcher = make(files_in_parallel=1, ranges_per_file=1)
    proxy.state.rules.append(Rule(r"/manifests/", status=404, body_bytes=256 * MiB, times=1))
    before = _reset_peak_rss()
    started = time.monotonic()
    err = _fails(fetcher, f"oci://{proxy.host}/bounded/errors:v1", SourceError, "HTTP 404")
    assert len(str(err)) < 600
    proxy.state.rules.append(Rule(BLOBS, status=500, body_bytes=-1))
    err = _fails(fetcher, f"oci://{proxy.host}/bounded/errors:v1", SourceError, "HTTP 500")
    elapsed = time.monotonic() - started
    growth = _status("VmHWM") - before
    print(f"peak RSS growth {growth / MiB:.1f} MiB, {elapsed:.2f}s for both")
    assert growth < 32 * MiB
    assert elapsed < 20


def test_a_huge_token_answer_is_refused(
    proxy: FaultProxy, publisher: ModelPublisher, make: Make, tmp_path: Path
) -> None:
    _pushed(publisher, "bounded/token")
    with run_hostile(huge_token(128 * MiB)) as realm:
        proxy.state.auth = "bearer"
        proxy.state.realm = f"{realm.url}/token"
        before = _reset_peak_rss()
        err = _fails(
            make(), f"oci://{proxy.host}/bounded/token:v1", SourceError, "larger than 262144"
        )
        growth = _status("VmHWM") - before
    print(f"peak RSS growth {growth / MiB:.1f} MiB")
    assert isinstance(err, SourceError) and err.reason == "auth"
    assert growth < 32 * MiB


# -- 3. stalls and deadlines ------------------------------------------------------------------


def test_a_trickling_blob_is_aborted_within_the_window_and_retried(
    proxy: FaultProxy, publisher: ModelPublisher, make: Make
) -> None:
    files = _pushed(publisher, "stall/blob")
    rule = Rule(BLOBS, stall_after=0, trickle_s=0.05, times=1)  # 20 bytes/s from the start
    proxy.state.rules.append(rule)
    fetcher = make(stall_bytes_per_s=256 * 1024, stall_window_s=0.5)
    started = time.monotonic()
    row = fetcher.warm(parse_reference(f"oci://{proxy.host}/stall/blob:v1"))
    elapsed = time.monotonic() - started
    print(f"model ready {elapsed:.2f}s after a 0.5s-window stall")
    assert rule.hits == 1
    assert read_tree(fetcher.store.model_path(row.digest)) == files
    assert 0.5 <= elapsed < 2 * 0.5 + 3  # the stall was waited out for one window, not more


def test_a_trickling_mirror_falls_through_to_the_origin(
    registry: Registry, proxy: FaultProxy, publisher: ModelPublisher, make: Make, tmp_path: Path
) -> None:
    files = _pushed(publisher, "stall/mirror")
    rule = Rule(BLOBS, stall_after=0, trickle_s=0.05)
    proxy.state.rules.append(rule)
    config = make_config(
        tmp_path / "s",
        registry=RegistryConfig(mirrors={registry.host: (Mirror(url=proxy.url),)}),
        stall_bytes_per_s=256 * 1024,
        stall_window_s=0.3,
        retry_delays=(),
    )
    row = make(config).warm(parse_reference(f"oci://{registry.host}/stall/mirror:v1"))
    assert rule.hits >= 3  # every file tried the mirror first
    assert (
        read_tree(Path(config.store.root) / "models" / row.digest.removeprefix("sha256:")) == files
    )


def test_a_trickling_manifest_hits_the_request_deadline(
    proxy: FaultProxy, publisher: ModelPublisher, make: Make
) -> None:
    _pushed(publisher, "stall/manifest")
    proxy.state.rules.append(Rule(r"/manifests/", stall_after=10, trickle_s=0.05))
    fetcher = make(request_deadline_s=0.5, retry_delays=())
    started = time.monotonic()
    err = _fails(fetcher, f"oci://{proxy.host}/stall/manifest:v1", SourceError, "deadline")
    elapsed = time.monotonic() - started
    print(f"manifest request aborted after {elapsed:.2f}s (deadline 0.5s)")
    assert isinstance(err, SourceError) and err.reason == "timeout"
    assert elapsed < 3


def test_a_stalled_source_frees_its_workers_for_other_models(
    registry: Registry, proxy: FaultProxy, publisher: ModelPublisher, make: Make
) -> None:
    """Two file workers per model; the slow model stalls on both of its own. The other model
    has its own workers and is ready while the slow one still stalls; the slow one's stalls are
    aborted after the window and its retries."""
    _pushed(publisher, "stall/slow", seed=1)
    fast_files = _pushed(publisher, "stall/fast", seed=2)
    stalling = threading.Event()
    proxy.state.rules.append(Rule(BLOBS, stall_after=0, trickle_s=0.05, before=stalling.set))
    fetcher = make(
        files_in_parallel=2,
        ranges_per_file=1,
        stall_bytes_per_s=256 * 1024,
        stall_window_s=0.5,
        retry_delays=(0.0,),
    )
    started = time.monotonic()
    slow = fetcher.warm_async(parse_reference(f"oci://{proxy.host}/stall/slow:v1"))
    assert stalling.wait(30), "the slow model never reached its blobs"
    fast = fetcher.warm_async(parse_reference(f"oci://{registry.host}/stall/fast:v1"))
    row = fast.result(timeout=60)
    fast_at = time.monotonic() - started
    with pytest.raises(SourceError) as info:
        slow.result(timeout=60)
    freed_at = time.monotonic() - started
    print(f"slow model failed (stalled) after {freed_at:.2f}s; other model ready at {fast_at:.2f}s")
    assert info.value.reason == "stalled"
    assert read_tree(fetcher.store.model_path(row.digest)) == fast_files
    assert freed_at < 2 * 2 * 0.5 + 5  # two attempts of at most two windows each
    assert fast_at < freed_at  # it never waited for the slow model's workers


# -- 4. ranges and S3 integrity ---------------------------------------------------------------


def test_a_lying_content_range_is_refused(
    proxy: FaultProxy, publisher: ModelPublisher, make: Make
) -> None:
    _pushed(publisher, "range/lie")
    proxy.state.rules.append(Rule(BLOBS, replace_headers={"Content-Range": "bytes 0-99/100"}))
    err = _fails(make(), f"oci://{proxy.host}/range/lie:v1", SourceError, "answered Content-Range")
    assert isinstance(err, SourceError) and err.reason == "invalid"


@pytest.fixture
def s3_proxy(s3: S3Endpoint) -> Iterator[FaultProxy]:
    """moto behind the fault-injecting proxy (moto does not check signatures)."""
    with run_fault_proxy(s3.url) as p:
        p.state.forward_auth = True
        yield p


def _client(url: str, s3: S3Endpoint) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=s3.region,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
        config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}),
    )


def _put_checked(client: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=prefix + name, Body=data, ChecksumAlgorithm="SHA256")


def test_s3_sha256_checksums_are_announced_and_verified(s3: S3Endpoint, make: Make) -> None:
    client = s3.client()
    client.create_bucket(Bucket="sums")
    files = sample_model(3, shard_bytes=PART + 7, shards=2)
    _put_checked(client, "sums", "right/", files)
    fetcher = make(s3_client=client)
    plan = fetcher.resolve(parse_reference("s3://sums/right/"))
    announced = {i.path: getattr(i, "sha256", None) for i in plan.items}
    assert announced == {n: "sha256:" + hashlib.sha256(d).hexdigest() for n, d in files.items()}
    row = fetcher.warm(parse_reference("s3://sums/right/"))
    assert read_tree(fetcher.store.model_path(row.digest)) == files


def test_s3_wrong_checksum_fails_the_fetch(
    s3: S3Endpoint, s3_proxy: FaultProxy, make: Make
) -> None:
    client = s3.client()
    client.create_bucket(Bucket="wrongsum")
    files = sample_model(4, shard_bytes=PART + 7, shards=1)
    _put_checked(client, "wrongsum", "m/", files)
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    s3_proxy.state.rules.append(
        Rule(
            r"/wrongsum/m/config\.json",
            method="HEAD",
            replace_headers={"x-amz-checksum-sha256": wrong},
        )
    )
    fetcher = make(s3_client=_client(s3_proxy.url, s3))
    err = _fails(fetcher, "s3://wrongsum/m/", DigestMismatch, "config.json hashes to")
    assert "source announced sha256:" + base64.b64decode(wrong).hex() in str(err)


def test_s3_single_part_etag_is_an_md5_and_multipart_is_not(s3: S3Endpoint, make: Make) -> None:
    client = s3.client()
    client.create_bucket(Bucket="etags")
    data = b"single part" * 1000
    client.put_object(Bucket="etags", Key="m/single.bin", Body=data)
    up = client.create_multipart_upload(
        Bucket="etags", Key="m/multi.bin", ChecksumAlgorithm="SHA256"
    )
    parts = []
    for n, body in ((1, b"a" * (5 * MiB)), (2, b"b" * 10)):
        r = client.upload_part(
            Bucket="etags",
            Key="m/multi.bin",
            UploadId=up["UploadId"],
            PartNumber=n,
            Body=body,
            ChecksumAlgorithm="SHA256",
        )
        parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumSHA256": r["ChecksumSHA256"]})
    client.complete_multipart_upload(
        Bucket="etags", Key="m/multi.bin", UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    single = integrity(
        client.head_object(Bucket="etags", Key="m/single.bin", ChecksumMode="ENABLED"), "single"
    )
    assert single.md5 == hashlib.md5(data).hexdigest() and not single.trusted_on_first_fetch
    multi = integrity(
        client.head_object(Bucket="etags", Key="m/multi.bin", ChecksumMode="ENABLED"), "multi"
    )
    # A multipart SHA-256 is a checksum of part checksums: never compared with the file's.
    assert multi.md5 is None and multi.sha256 is None and multi.trusted_on_first_fetch
    fetcher = make(s3_client=client)
    plan = fetcher.resolve(parse_reference("s3://etags/m/"))
    assert {i.path: getattr(i, "sha256", "") for i in plan.items} == {
        "single.bin": None,
        "multi.bin": None,
    }
    assert {i.path: getattr(i, "md5", "") for i in plan.items} == {
        "single.bin": hashlib.md5(data).hexdigest(),
        "multi.bin": None,
    }
    # The multipart object can be checked against nothing: the model says so.
    row = fetcher.warm(parse_reference("s3://etags/m/"))
    assert row.trust == "first-fetch"
    client.delete_object(Bucket="etags", Key="m/multi.bin")
    row = fetcher.warm(parse_reference("s3://etags/m/"))
    assert row.trust == "digest"  # the MD5 was checked


def test_s3_bytes_that_differ_from_the_md5_etag_fail_the_fetch(
    s3: S3Endpoint, s3_proxy: FaultProxy, make: Make
) -> None:
    client = s3.client()
    client.create_bucket(Bucket="md5")
    client.put_object(Bucket="md5", Key="m/w.bin", Body=os.urandom(PART + 11))
    s3_proxy.state.rules.append(Rule(r"/md5/m/w\.bin", flip_at=5, times=1))
    fetcher = make(s3_client=_client(s3_proxy.url, s3))
    _fails(fetcher, "s3://md5/m/", DigestMismatch, "w.bin has MD5")
    assert models_dir_entries(fetcher.store.layout.root) == []


def test_s3_lying_content_range_is_refused(
    s3: S3Endpoint, s3_proxy: FaultProxy, make: Make
) -> None:
    client = s3.client()
    client.create_bucket(Bucket="lies")
    publish_s3(client, "lies", "m/", {"w.bin": b"w" * (PART + 5)})
    s3_proxy.state.rules.append(
        Rule(r"/lies/m/w\.bin", replace_headers={"Content-Range": "bytes 5-1048580/1048581"})
    )
    fetcher = make(s3_client=_client(s3_proxy.url, s3))
    err = _fails(fetcher, "s3://lies/m/", SourceError, "answered Content-Range")
    assert isinstance(err, SourceError) and err.reason == "invalid"


@pytest.mark.parametrize("versioned", [False, True])
def test_s3_object_changed_mid_fetch(
    s3: S3Endpoint, s3_proxy: FaultProxy, make: Make, tmp_path: Path, versioned: bool
) -> None:
    """Unversioned: the fetch fails as changed (If-Match), the old model stays ready and intact.
    Versioned: every range reads the version resolved, so the fetch completes consistently."""
    bucket = f"change{int(versioned)}"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    if versioned:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    v1 = {"config.json": b"{}", "w.bin": b"1" * (3 * PART)}
    publish_s3(client, bucket, "m/", v1)
    fetcher = make(
        make_config(tmp_path / "s", files_in_parallel=1, ranges_per_file=1),
        s3_client=_client(s3_proxy.url, s3),
    )
    old = fetcher.warm(parse_reference(f"s3://{bucket}/m/"))
    v2 = {**v1, "w.bin": b"2" * (3 * PART)}
    publish_s3(client, bucket, "m/", {"w.bin": v2["w.bin"]})
    rule = Rule(
        rf"/{bucket}/m/w\.bin",
        range_from=PART,
        times=1,
        before=lambda: publish_s3(s3.client(), bucket, "m/", {"w.bin": b"3" * (3 * PART)}),
    )
    s3_proxy.state.rules.append(rule)
    ref = parse_reference(f"s3://{bucket}/m/")
    if versioned:
        row = fetcher.warm(ref)
        assert read_tree(fetcher.store.model_path(row.digest)) == v2
    else:
        with pytest.raises(SourceError, match="changed") as info:
            fetcher.warm(ref)
        assert info.value.reason == "changed"
        assert models_dir_entries(fetcher.store.config.root) == [old.digest.removeprefix("sha256:")]
    assert rule.hits == 1
    kept = fetcher.store.model(old.digest)
    assert kept is not None and kept.state == ModelState.READY
    assert read_tree(fetcher.store.model_path(old.digest)) == v1


def test_s3_without_credentials_fails_at_once_saying_what_to_set(
    s3: S3Endpoint, make: Make
) -> None:
    import botocore.session
    from botocore.credentials import CredentialResolver

    session = botocore.session.Session()
    session.register_component("credential_provider", CredentialResolver(providers=[]))
    client = session.create_client("s3", endpoint_url=s3.url, region_name=s3.region)
    fetcher = make(s3_client=client, retry_delays=(5.0, 5.0))  # a retry would show in the time
    started = time.monotonic()
    err = _fails(fetcher, "s3://nocreds/m/", SourceError, "AWS_ACCESS_KEY_ID")
    assert time.monotonic() - started < 4
    assert isinstance(err, SourceError) and err.reason == "auth" and not err.retryable
    assert "Unable to locate credentials" in str(err)


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        ("AccessDenied", "s3:GetObject"),
        ("InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"),
        ("SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY"),
    ],
)
def test_s3_refused_credentials_fail_at_once_naming_the_fix(
    s3: S3Endpoint, make: Make, code: str, fix: str
) -> None:
    with run_hostile(s3_error(403, code)) as endpoint:
        fetcher = make(s3_client=_client(endpoint.url, s3))
        err = _fails(fetcher, "s3://denied/m/", SourceError, fix)
        assert len(endpoint.seen) == 1
    assert isinstance(err, SourceError) and err.reason == "auth" and not err.retryable
    assert code in str(err)


# -- 6. local directories ---------------------------------------------------------------------


def _hf_cache(hub: Path, files: dict[str, bytes]) -> Path:
    """A Hugging Face hub cache: content in blobs/, the snapshot's files link there."""
    repo = hub / "models--org--m"
    snapshot = repo / "snapshots" / ("ab" * 20)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def test_a_hugging_face_cache_snapshot_is_a_file_source_under_an_allowed_root(
    tmp_path: Path,
) -> None:
    files = sample_model(9)
    snapshot = _hf_cache(tmp_path / "hub", files)
    ref = parse_reference(f"file://{snapshot}")

    def fetcher(*roots: Path) -> Fetcher:
        config = make_config(
            tmp_path / f"store-{roots[0].name}-{len(made)}", policy=PolicyConfig(file_roots=roots)
        )
        made.append(build_fetcher(config, Store(config.store)))
        return made[-1]

    made: list[Fetcher] = []

    whole = fetcher(tmp_path / "hub")
    try:
        row = whole.warm(ref)
        assert read_tree(whole.store.model_path(row.digest)) == files
    finally:
        whole.close()
        whole.store.close()
    # The cache is not wholly under a root: its links leave the allowed directory.
    partial = fetcher(snapshot)
    try:
        with pytest.raises(UnsafeContent, match="points outside"):
            partial.warm(ref)
    finally:
        partial.close()
        partial.store.close()
    # A snapshot link out of the cache's repository folder is refused even under the root.
    secret = tmp_path / "hub" / "other" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"another tenant's file")
    os.symlink(secret, snapshot / "stolen.bin")
    escaping = fetcher(tmp_path / "hub")
    try:
        with pytest.raises(UnsafeContent, match=r"stolen\.bin"):
            escaping.warm(ref)
    finally:
        escaping.close()
        escaping.store.close()
