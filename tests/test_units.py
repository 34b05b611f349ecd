"""Small units with a seam of their own: rate limiting, config parsing, endpoints, hashing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import xxhash

from weightcache.daemon.config import ConfigError, Mirror, RegistryConfig, load_config
from weightcache.daemon.hashing import StreamHasher
from weightcache.daemon.ratelimit import RateLimiter
from weightcache.daemon.references import parse_reference
from weightcache.daemon.sources.oci_http import RegistryHTTP, is_loopback, load_docker_config


class FakeTime:
    """A clock that only moves when something waits on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return False


def test_rate_limiter_spaces_bytes_at_the_configured_rate() -> None:
    fake = FakeTime()
    stop = threading.Event()
    stop.wait = fake.wait  # type: ignore[method-assign]
    limiter = RateLimiter(1_000_000, stop, clock=fake.clock)
    for _ in range(10):
        limiter.consume(500_000)
    # 5 MB at 1 MB/s: the first half-megabyte goes at once, the rest waits 4.5 s in all.
    assert sum(fake.waits) == pytest.approx(4.5)
    assert fake.now - 100.0 == pytest.approx(4.5)


def test_rate_limiter_zero_means_unlimited() -> None:
    fake = FakeTime()
    limiter = RateLimiter(0, threading.Event(), clock=fake.clock)
    limiter.consume(10**12)
    assert fake.waits == []


def test_stream_hasher_matches_the_reference_hashes() -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    h = StreamHasher(chunk_size=1024 * 1024)
    completed = []
    for i in range(0, len(data), 700_001):
        completed += h.update(data[i : i + 700_001])
    fp = h.finish()
    assert fp.sha256 == "sha256:" + hashlib.sha256(data).hexdigest()
    assert fp.xxh3 == xxhash.xxh3_128_hexdigest(data)
    assert fp.chunk_count == 6 and len(completed) == 5
    for i in range(6):
        chunk = data[i * 1024 * 1024 : (i + 1) * 1024 * 1024]
        assert fp.chunk_digest(i) == xxhash.xxh3_128_digest(chunk)


def test_config_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "wc.toml"
    path.write_text(
        "[store]\nbudget_bytes = 1000000000\nhigh_watermark = 0.95\n"
        "[fetch]\nfiles_in_parallel = 8\nretry_delays = [1, 2]\nbandwidth_bytes_per_s = 5000\n"
        '[registry]\ninsecure = ["registry.lan:5000"]\ndocker_config = "/etc/wc/config.json"\n'
        '[registry.mirrors]\n"docker.io" = [{url = "http://127.0.0.1:5001", resolve = true},'
        ' "https://mirror.example"]\n'
    )
    config = load_config(path, root=tmp_path / "store")
    assert config.store.root == tmp_path / "store"
    assert config.store.budget_bytes == 1_000_000_000
    assert config.fetch.retry_delays == (1, 2)
    assert config.registry.insecure == ("registry.lan:5000",)
    assert config.registry.mirrors["docker.io"] == (
        Mirror(url="http://127.0.0.1:5001", resolve=True),
        Mirror(url="https://mirror.example"),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[store]\nbudget = 1\n", "unknown setting"),
        ("[nope]\n", "unknown section"),
        ("[fetch]\nfiles_in_parallel = 0\n", "at least 1"),
        ("[fetch]\npart_bytes = 1000000\n", "multiple of 4096"),
        ("[store]\nlow_watermark = 0.95\nhigh_watermark = 0.9\n", "low_watermark"),
        ("[fetch]\ntimeout_s = 'soon'\n", "expected a number"),
        ("[store\n", "not valid TOML"),
        ('[registry.mirrors]\n"r" = [{resolve = true}]\n', "expected {url"),
    ],
)
def test_bad_config_is_refused_with_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "wc.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_bad_config_on_the_command_line_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "wc.toml"
    path.write_text("[fetch]\nfiles_in_parallel = -1\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "weightcache.app",
            "ls",
            "--store",
            str(tmp_path / "s"),
            "--config",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert "files_in_parallel" in out.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("localhost", True),
        ("[::1]", True),
        ("10.0.0.1", False),
        ("registry.example", False),
        ("localhost.evil", False),
    ],
)
def test_only_loopback_is_plain_http_by_default(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    http = RegistryHTTP(RegistryConfig(insecure=("lan:5000",)), {}, timeout_s=5)
    ref = parse_reference(f"oci://{host}:5000/m:v1")
    (origin,) = http.endpoints(ref, resolving=True)  # type: ignore[arg-type]
    assert origin.base.startswith("http://" if loopback else "https://")
    lan = parse_reference("oci://lan:5000/m:v1")
    assert http.endpoints(lan, resolving=True)[0].base == "http://lan:5000"  # type: ignore[arg-type]


def test_mirrors_resolve_tags_only_with_the_capability() -> None:
    config = RegistryConfig(
        mirrors={"r.io": (Mirror("http://127.0.0.1:1"), Mirror("http://127.0.0.1:2", resolve=True))}
    )
    http = RegistryHTTP(config, {}, timeout_s=5)
    ref = parse_reference("oci://r.io/m:v1")
    by_digest = [e.base for e in http.endpoints(ref, resolving=False)]  # type: ignore[arg-type]
    by_tag = [e.base for e in http.endpoints(ref, resolving=True)]  # type: ignore[arg-type]
    assert by_digest == ["http://127.0.0.1:1", "http://127.0.0.1:2", "https://r.io"]
    assert by_tag == ["http://127.0.0.1:2", "https://r.io"]


def test_docker_config_forms(tmp_path: Path) -> None:
    import base64
    import json

    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"u1:p1").decode()},
                    "r.io:5000": {"username": "u2", "password": "p2"},
                    "t.io": {"identitytoken": "tok"},
                    "empty.io": {},
                }
            }
        )
    )
    creds = load_docker_config(path)
    assert {h: (c.username, c.password) for h, c in creds.items()} == {
        "docker.io": ("u1", "p1"),
        "r.io:5000": ("u2", "p2"),
        "t.io": ("<token>", "tok"),
    }
