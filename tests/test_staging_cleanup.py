"""What a fetch leaves in staging/: partial downloads stay for a resume, but not forever, and
fetch locks exist only while a fetch runs. Against the real registry behind the fault proxy,
and the real ``weightcache gc``."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from helpers import PART, Hold, make_config, models_dir_entries, run_cli

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.errors import SourceError
from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.store import Store
from weightcache.testing.faultproxy import FaultProxy, Rule
from weightcache.testing.models import ModelPublisher

DAY = 24 * 3600


def _partials(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "staging").iterdir() if p.suffix != ".lock")


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_fetch_that_failed_for_good_leaves_its_partial_only_until_it_is_too_old(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path
) -> None:
    files = {"w.bin": os.urandom(4 * PART)}
    publisher.oras("cleanup/auth", "v1", files)
    sha = hashlib.sha256(files["w.bin"]).hexdigest()
    # The registry stops serving after the first part: an auth error, not retried.
    proxy.state.rules.append(Rule(path=r"/blobs/sha256:" + sha, status=403, range_from=PART))
    config = make_config(tmp_path / "store", ranges_per_file=1)
    store_dir = config.store.root
    fetcher = build_fetcher(config, Store(config.store))
    try:
        with pytest.raises(SourceError) as failed:
            fetcher.warm(parse_reference(f"oci://{proxy.host}/cleanup/auth:v1"))
        assert failed.value.reason == "auth"
    finally:
        fetcher.close()
        fetcher.store.close()
    assert _partials(store_dir) == [f"{sha}.chunks", f"{sha}.part"]  # kept for a resume
    assert models_dir_entries(store_dir) == []
    gc = run_cli("gc", "--store", str(store_dir))
    assert gc.returncode == 0, gc.stderr
    assert _partials(store_dir) == [f"{sha}.chunks", f"{sha}.part"]  # young: still kept
    _age(store_dir / "staging" / f"{sha}.part", DAY + 60)
    gc = run_cli("gc", "--store", str(store_dir))
    assert gc.returncode == 0, gc.stderr
    assert _partials(store_dir) == []
    # The same at start: an old partial left by an earlier run is gone once the store opens.
    (store_dir / "staging" / "old.part").write_bytes(b"x" * 4096)
    (store_dir / "staging" / "orphan.chunks").write_bytes(b"y" * 16)
    _age(store_dir / "staging" / "old.part", DAY + 60)
    Store(config.store).close()
    assert _partials(store_dir) == []


def test_a_partial_someone_is_writing_is_never_removed(tmp_path: Path) -> None:
    config = make_config(tmp_path / "store", store={"partial_max_age_s": 0.0})
    store = Store(config.store)
    try:
        with store.partial("busy", 8 * PART, PART) as partial:
            partial.write(0, memoryview(bytearray(PART)))
            _age(partial.path, DAY)
            assert store.clean_staging() == 0
            assert partial.path.exists() and partial.log_path.exists()
        assert store.clean_staging() > 0  # released: now it goes
        assert _partials(config.store.root) == []
    finally:
        store.close()


def test_fetch_locks_exist_only_while_a_fetch_runs(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path
) -> None:
    publisher.oras("cleanup/lock", "v1", {"w.bin": os.urandom(2 * PART)})
    hold = Hold()
    proxy.state.rules.append(Rule(path=r"/blobs/", before=hold, times=1))
    config = make_config(tmp_path / "store")
    staging = config.store.root / "staging"
    fetcher = build_fetcher(config, Store(config.store))
    try:
        ref = parse_reference(f"oci://{proxy.host}/cleanup/lock:v1")
        done = threading.Event()
        fut = fetcher.warm_async(ref)
        fut.add_done_callback(lambda _: done.set())
        assert hold.arrived.wait(60)
        locks = sorted(p.name for p in staging.glob("*.lock"))
        assert len(locks) == 1  # the running fetch holds its model's lock
        hold.release.set()
        row = fut.result(timeout=60)
        assert done.wait(10) and row.state == "ready"
        assert list(staging.glob("*.lock")) == []  # gone with the fetch
    finally:
        hold.release.set()
        fetcher.close()
        fetcher.store.close()
    # A lock a crashed process left behind is removed when the store opens.
    (staging / ("ab" * 32 + ".lock")).touch()
    Store(config.store).close()
    assert list(staging.glob("*.lock")) == []
