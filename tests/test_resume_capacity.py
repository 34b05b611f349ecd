"""Crash and restart, capacity, eviction, pins and re-checks, through real processes and disks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    PART,
    Hold,
    make_config,
    models_dir_entries,
    read_tree,
    run_cli,
    small_filesystem,
)

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.errors import InsufficientSpace
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.references import parse_reference
from weightcache.daemon.repair import Repairer
from weightcache.daemon.store.states import ModelState
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import verify_store
from weightcache.testing.faultproxy import FaultProxy, Rule
from weightcache.testing.models import ModelPublisher, sample_model, write_files

BLOBS = r"/v2/.*/blobs/sha256:"


def _blob_bytes(proxy: FaultProxy) -> int:
    return proxy.state.blob_bytes_relayed


def _cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, *(["--config", str(config)] if config else []))


def _toml(path: Path, ranges_per_file: int = 2) -> Path:
    path.write_text(
        f"[fetch]\npart_bytes = {PART}\nretry_delays = [0.0]\n"
        f"files_in_parallel = 2\nranges_per_file = {ranges_per_file}\n"
    )
    return path


def test_restart_redownloads_nothing(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path
) -> None:
    files = sample_model(30, shard_bytes=3 * PART, shards=2)
    publisher.oras("resume/done", "v1", files)
    ref = f"oci://{proxy.host}/resume/done:v1"
    config = _toml(tmp_path / "wc.toml")
    store = tmp_path / "store"
    first = _cli("warm", ref, "--store", str(store), "--json", config=config)
    assert first.returncode == 0, first.stderr
    relayed = _blob_bytes(proxy)
    assert relayed >= sum(len(v) for v in files.values())
    second = _cli("warm", ref, "--store", str(store), "--json", config=config)
    assert second.returncode == 0, second.stderr
    assert _blob_bytes(proxy) == relayed  # 0 blob bytes on restart
    doc = json.loads(second.stdout)
    assert doc["models"][0]["state"] == "ready"


def test_sigkill_mid_fetch_then_resume_redownloads_only_what_is_missing(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path
) -> None:
    files = {"big.safetensors": os.urandom(6 * PART + 777)}
    publisher.oras("resume/kill", "v1", files)
    sha = hashlib.sha256(files["big.safetensors"]).hexdigest()
    hold = Hold()
    # Requests for the 4th chunk onward hang, so the process is killed with 3 chunks on disk.
    proxy.state.rules.append(Rule(rf"/blobs/sha256:{sha}", range_from=3 * PART, before=hold))
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weightcache.app",
            "warm",
            f"oci://{proxy.host}/resume/kill:v1",
            "--store",
            str(store),
            "--config",
            str(_toml(tmp_path / "wc.toml", ranges_per_file=1)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert hold.arrived.wait(120), "the download never reached the held range"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        hold.release.set()
    partial = store / "staging" / f"{sha}.part"
    kept = partial.stat().st_size
    assert kept == 3 * PART
    assert models_dir_entries(store) == []
    proxy.state.rules.clear()
    before = _blob_bytes(proxy)
    done = _cli(
        "warm",
        f"oci://{proxy.host}/resume/kill:v1",
        "--store",
        str(store),
        config=_toml(tmp_path / "wc.toml", ranges_per_file=1),
    )
    assert done.returncode == 0, done.stderr
    redownloaded = _blob_bytes(proxy) - before
    assert redownloaded == len(files["big.safetensors"]) - kept
    (tree,) = (store / "models").iterdir()
    assert read_tree(tree) == files


def test_a_damaged_partial_chunk_is_fetched_again(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path
) -> None:
    files = {"w.bin": os.urandom(4 * PART)}
    publisher.oras("resume/damaged", "v1", files)
    sha = hashlib.sha256(files["w.bin"]).hexdigest()
    config = make_config(tmp_path / "store")
    staging = tmp_path / "store" / "staging"
    staging.mkdir(parents=True)
    # A partial file from an earlier run whose second chunk was damaged on disk.
    data = bytearray(files["w.bin"][: 3 * PART])
    data[PART + 5] ^= 0xFF
    (staging / f"{sha}.part").write_bytes(data)
    from weightcache.daemon.hashing import chunk_xxh3

    (staging / f"{sha}.chunks").write_bytes(
        b"".join(chunk_xxh3(files["w.bin"][i * PART : (i + 1) * PART]) for i in range(3))
    )
    fetcher = build_fetcher(config, Store(config.store))
    try:
        row = fetcher.warm(parse_reference(f"oci://{proxy.host}/resume/damaged:v1"))
        assert read_tree(fetcher.store.model_path(row.digest)) == files
        assert _blob_bytes(proxy) == 3 * PART  # chunk 0 kept; chunks 1..3 fetched
    finally:
        fetcher.close()
        fetcher.store.close()


# -- capacity ---------------------------------------------------------------------------------


def _local_model(tmp_path: Path, seed: int, size: int) -> str:
    src = write_files(tmp_path / f"src{seed}", {"w.bin": os.urandom(size)})
    return f"file://{src}"


def test_lru_eviction_makes_room_and_pins_are_kept(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "store",
        store={"budget_bytes": 10 * PART, "high_watermark": 0.9, "low_watermark": 0.5},
    )
    store = Store(config.store)
    fetcher = build_fetcher(config, store)
    try:
        a = fetcher.warm(parse_reference(_local_model(tmp_path, 1, 4 * PART)))
        b = fetcher.warm(parse_reference(_local_model(tmp_path, 2, 4 * PART)))
        store.pin(a.digest, "mount", "/pods/x/volumes/m")
        c = fetcher.warm(parse_reference(_local_model(tmp_path, 3, 4 * PART)))
        held = {r.digest for r in store.models()}
        assert held == {a.digest, c.digest}  # b was least recently used and unpinned
        assert not store.model_path(b.digest).exists()
        with pytest.raises(
            InsufficientSpace,
            match=r"needs \d+ more bytes; store budget "
            r"10485760 bytes.*pinned",
        ):
            store.pin(c.digest, "warm", "default/deploy/llm")
            fetcher.warm(parse_reference(_local_model(tmp_path, 4, 4 * PART)))
        assert {r.digest for r in store.models() if r.state == ModelState.READY} == {
            a.digest,
            c.digest,
        }
    finally:
        fetcher.close()
        store.close()


def test_gc_evicts_down_to_target_but_never_pinned(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    config = make_config(store_dir)
    store = Store(config.store)
    fetcher = build_fetcher(config, store)
    try:
        rows = [
            fetcher.warm(parse_reference(_local_model(tmp_path, i, 2 * PART))) for i in range(3)
        ]
        store.pin(rows[0].digest, "warm", "ns/deploy/a")
    finally:
        fetcher.close()
        store.close()
    out = _cli("gc", "--store", str(store_dir), "--target-bytes", "0")
    assert out.returncode == 0, out.stderr
    ls = json.loads(_cli("ls", "--store", str(store_dir), "--json").stdout)
    assert [m["digest"] for m in ls["models"]] == [rows[0].digest]
    assert ls["models"][0]["pins"] == [{"kind": "warm", "holder": "ns/deploy/a"}]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB filesystem of its own."""
    with small_filesystem(tmp_path / "tiny", "12m") as mount:
        yield mount


def test_a_model_larger_than_the_disk_fails_before_fetching(tmp_path: Path, tiny_fs: Path) -> None:
    config = make_config(tiny_fs / "store")
    fetcher = build_fetcher(config, Store(config.store))
    try:
        with pytest.raises(InsufficientSpace, match="needs 16777216 more bytes"):
            fetcher.warm(parse_reference(_local_model(tmp_path, 5, 16 * PART)))
        assert models_dir_entries(tiny_fs / "store") == []
    finally:
        fetcher.close()
        fetcher.store.close()


def test_a_disk_that_fills_mid_fetch(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path, tiny_fs: Path
) -> None:
    files = {"w.bin": os.urandom(8 * PART)}
    publisher.oras("full/disk", "v1", files)

    def fill() -> None:
        # Another tenant of the disk takes the space after the capacity check passed,
        # leaving a little for the index to record what happened.
        vfs = os.statvfs(tiny_fs)
        (tiny_fs / "filler").write_bytes(b"\1" * (vfs.f_bavail * vfs.f_frsize - 256 * 1024))

    proxy.state.rules.append(Rule(BLOBS, range_from=2 * PART, before=fill, times=1))
    config = make_config(tiny_fs / "store")
    fetcher = build_fetcher(config, Store(config.store))
    try:
        with pytest.raises(InsufficientSpace, match="disk full while fetching"):
            fetcher.warm(parse_reference(f"oci://{proxy.host}/full/disk:v1"))
        assert models_dir_entries(tiny_fs / "store") == []
        assert not any((tiny_fs / "store" / "staging").glob("*.part"))
        (row,) = fetcher.store.models()
        assert row.state == "failed" and "disk full" in row.error
    finally:
        fetcher.close()
        fetcher.store.close()


# -- verify -----------------------------------------------------------------------------------


def _ready_model(tmp_path: Path) -> tuple[Path, str, dict[str, bytes]]:
    files = sample_model(40, shard_bytes=2 * PART + 3, shards=2)
    src = write_files(tmp_path / "src", files)
    store_dir = tmp_path / "store"
    config = make_config(store_dir)
    fetcher = build_fetcher(config, Store(config.store))
    try:
        row = fetcher.warm(parse_reference(f"file://{src}"))
    finally:
        fetcher.close()
        fetcher.store.close()
    return store_dir, row.digest, files


def test_verify_full_catches_a_flipped_byte_and_quarantines(tmp_path: Path) -> None:
    store_dir, digest, _ = _ready_model(tmp_path)
    victim = (
        store_dir / "models" / digest.removeprefix("sha256:") / "model-00002-of-00002.safetensors"
    )
    st = victim.stat()
    with open(victim, "r+b") as f:  # root ignores the 0444 mode, as a careless admin would
        f.seek(PART + 10)
        b = f.read(1)
        f.seek(PART + 10)
        f.write(bytes([b[0] ^ 1]))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide it from the fast check
    fast = _cli("verify", "--store", str(store_dir), "--json")
    assert fast.returncode == 0, fast.stderr
    full = _cli("verify", "--store", str(store_dir), "--full", "--json")
    assert full.returncode == 1
    report = json.loads(full.stdout)
    (problem,) = report["problems"]
    assert problem["path"] == "model-00002-of-00002.safetensors"
    assert problem["bad_chunks"] == [1]
    assert not victim.exists()
    assert len(list((store_dir / "quarantine").iterdir())) == 1
    ls = json.loads(_cli("ls", "--store", str(store_dir), "--json").stdout)
    assert ls["models"][0]["state"] == ModelState.CORRUPT


def test_verify_fast_catches_a_replaced_file(tmp_path: Path) -> None:
    store_dir, digest, files = _ready_model(tmp_path)
    tree = store_dir / "models" / digest.removeprefix("sha256:")
    os.chmod(tree, 0o755)
    (tree / "config.json").unlink()
    (tree / "config.json").write_bytes(files["config.json"])  # same bytes, new inode
    os.chmod(tree, 0o555)
    out = _cli("verify", "--store", str(store_dir), "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout)["problems"][0]["reason"].startswith("inode changed")


def test_warm_heals_a_corrupt_model(tmp_path: Path) -> None:
    store_dir, digest, files = _ready_model(tmp_path)
    tree = store_dir / "models" / digest.removeprefix("sha256:")
    with open(tree / "config.json", "r+b") as f:
        f.write(b"X")
    config = make_config(store_dir)
    store = Store(config.store)
    fetcher = build_fetcher(config, store)
    try:
        repairer = Repairer(store, None)  # as `weightcache verify` does: quarantine, no repair
        report = verify_store(
            store, full=True, damaged=lambda problems: repairer.damaged(problems, repair=False)
        )
        assert not report.ok and store.model(digest).state == ModelState.CORRUPT  # type: ignore[union-attr]
        row = fetcher.warm(parse_reference(f"file://{tmp_path / 'src'}"))
        assert row.state == ModelState.READY
        assert read_tree(store.model_path(digest)) == files
        assert verify_store(store, full=True).ok
    finally:
        fetcher.close()
        store.close()


def test_reopening_rebuilds_nothing_and_keeps_state(tmp_path: Path) -> None:
    store_dir, digest, files = _ready_model(tmp_path)
    (store_dir / "models" / "deadbeef").mkdir()  # a tree the index does not know
    store = Store(make_config(store_dir).store)
    try:
        assert [r.digest for r in store.models()] == [digest]
        assert not (store_dir / "models" / "deadbeef").exists()
        assert read_tree(store.model_path(digest)) == files
    finally:
        store.close()


def test_fetcher_joins_concurrent_callers(
    proxy: FaultProxy, publisher: ModelPublisher, fetcher: Fetcher
) -> None:
    files = sample_model(50, shard_bytes=2 * PART)
    publisher.oras("join/model", "v1", files)
    ref = parse_reference(f"oci://{proxy.host}/join/model:v1")
    futures = [fetcher.warm_async(ref) for _ in range(5)]
    rows = [f.result() for f in futures]
    assert len({r.digest for r in rows}) == 1
    assert proxy.state.blob_bytes_relayed == sum(len(v) for v in files.values())


def test_models_sharing_files_warm_concurrently(tmp_path: Path) -> None:
    shared = {f"d/f{i}.bin": os.urandom(1000 + i) for i in range(40)}
    a = write_files(tmp_path / "a", {**shared, "a.txt": b"a"})
    b = write_files(tmp_path / "b", {**shared, "b.txt": b"b"})
    for attempt in range(10):
        config = make_config(tmp_path / f"store{attempt}")
        fetcher = build_fetcher(config, Store(config.store))
        try:
            futures = [fetcher.warm_async(parse_reference(f"file://{p}")) for p in (a, b)]
            rows = [f.result() for f in futures]
            trees = [read_tree(fetcher.store.model_path(r.digest)) for r in rows]
            assert trees == [{**shared, "a.txt": b"a"}, {**shared, "b.txt": b"b"}]
            assert verify_store(fetcher.store, full=True).ok
            blobs = fetcher.store.index.scalar("SELECT COUNT(*) FROM blobs")
            assert blobs == len(shared) + 2
        finally:
            fetcher.close()
            fetcher.store.close()


def test_a_failed_fetch_is_not_remembered(tmp_path: Path, fetcher: Fetcher) -> None:
    from weightcache.daemon.errors import SourceError

    src = tmp_path / "later"
    ref = parse_reference(f"file://{src}")
    for _ in range(3):  # a fetch that fails at once must neither hang nor stick
        with pytest.raises(SourceError, match="does not exist"):
            fetcher.warm(ref)
    write_files(src, {"w.bin": b"weights"})
    assert fetcher.warm(ref).state == ModelState.READY
