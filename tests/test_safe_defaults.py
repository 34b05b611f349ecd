"""Safe defaults on GPU nodes: the store leaves a reserve of free space above the kubelet's
eviction thresholds, and the scrubber paces one full pass per interval.

The reserve is checked on a real filesystem of a known size (a tmpfs mounted for the test), the
pacing on a real store through the real scrubber and its token bucket."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_config, small_filesystem

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.config import PACED, ConfigError, ScrubConfig, StoreConfig, parse_config
from weightcache.daemon.errors import InsufficientSpace
from weightcache.daemon.references import parse_reference
from weightcache.daemon.scrubber import Scrubber
from weightcache.daemon.store.states import PinKind
from weightcache.daemon.store.store import Store
from weightcache.testing.models import write_files

MIB = 1024 * 1024
KUBELET_NODEFS_HARD = 0.10
"""The kubelet's default hard eviction threshold nodefs.available<10%."""
KUBELET_IMAGEFS_HARD = 0.15
"""imagefs.available<15% (the same filesystem as nodefs on most nodes), which is also where
image garbage collection starts (imageGCHighThresholdPercent 85)."""


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB filesystem of its own, so free space and size are known."""
    with small_filesystem(tmp_path / "fs", "32m") as mount:
        yield mount


def test_the_default_reserve_stays_above_the_kubelet_eviction_thresholds() -> None:
    reserve = StoreConfig().reserve_fraction
    assert reserve > max(KUBELET_NODEFS_HARD, KUBELET_IMAGEFS_HARD)
    assert reserve - KUBELET_IMAGEFS_HARD >= 0.05  # a margin for logs, images and emptyDirs
    assert reserve < 0.5  # most of the disk is still the cache's


def test_the_default_budget_is_the_filesystem_less_the_reserve(small_fs: Path) -> None:
    store = Store(StoreConfig(root=small_fs / "store"))
    try:
        usage = store.usage()
    finally:
        store.close()
    size = 32 * MIB
    assert usage.reserve == int(size * 0.20)
    assert usage.budget == size - usage.reserve
    assert usage.room == usage.fs_free - usage.reserve
    # A floor in bytes wins when it is larger.
    store = Store(StoreConfig(root=small_fs / "store", reserve_bytes=20 * MIB))
    try:
        assert store.usage().reserve == 20 * MIB
    finally:
        store.close()


def test_a_fetch_that_would_cross_the_reserve_is_refused_with_the_sizes(
    tmp_path: Path, small_fs: Path
) -> None:
    files = {"weights.bin": bytes(range(256)) * (4 * MIB // 256)}  # 4 MiB
    first = write_files(tmp_path / "src-a", files)
    second = write_files(tmp_path / "src-b", {"weights.bin": b"\x01" * (4 * MIB)})
    config = make_config(
        small_fs / "store", store={"reserve_fraction": StoreConfig().reserve_fraction}
    )
    store = Store(config.store)
    fetcher = build_fetcher(config, store)
    try:
        held = fetcher.warm(parse_reference(f"file://{first}"))
        store.pin(held.digest, PinKind.MOUNT, "/pods/a/volumes/model")  # not evictable
        # Something else on the node fills the disk to 2 MiB above the reserve: the 4 MiB
        # model would still fit on the disk, but not without eating into the reserve.
        usage = store.usage()
        filler = small_fs / "other-tenant.bin"
        with filler.open("wb") as f:
            f.write(b"\0" * (usage.fs_free - usage.reserve - 2 * MIB))
        with pytest.raises(InsufficientSpace) as exc:
            fetcher.warm(parse_reference(f"file://{second}"))
        message = str(exc.value)
        after = store.usage()
        assert f"needs {4 * MIB} more bytes" in message
        assert f"of which {after.reserve} stay free (the reserve)" in message
        free = int(re.search(r"(\d+) free on the filesystem", message)[1])  # type: ignore[index]
        assert free - after.reserve < 4 * MIB <= free  # it fit the disk, not above the reserve
        assert after.fs_free >= after.reserve  # nothing was written into the reserve
        assert store.model(held.digest) is not None  # the pinned model stays
        filler.unlink()
        row = fetcher.warm(parse_reference(f"file://{second}"))
        assert row.size == 4 * MIB
    finally:
        fetcher.close()
        store.close()


def test_reserve_settings_are_validated() -> None:
    for bad in ({"reserve_fraction": 1.0}, {"reserve_fraction": -0.1}, {"reserve_bytes": -1}):
        with pytest.raises(ConfigError):
            parse_config({"store": bad})
    assert parse_config({"store": {"reserve_fraction": 0.0}}).store.reserve_fraction == 0.0


# -- scrubber pacing ---------------------------------------------------------------------------


def test_the_default_scrub_is_one_pass_a_day_at_the_lowest_rate() -> None:
    config = ScrubConfig()
    assert config.interval_s == 24 * 3600 and config.bytes_per_s == PACED
    assert parse_config({"scrub": {"interval_s": 3600}}).scrub.interval_s == 3600.0
    for bad in ({"interval_s": -1}, {"bytes_per_s": -2}):
        with pytest.raises(ConfigError):
            parse_config({"scrub": bad})


def test_a_paced_pass_reads_at_held_bytes_over_the_interval(tmp_path: Path) -> None:
    files = {f"shard-{i}.bin": bytes([i]) * MIB for i in range(4)}  # 4 MiB in four blobs
    ref = parse_reference(f"file://{write_files(tmp_path / 'src', files)}")
    config = make_config(tmp_path / "store")
    store = Store(config.store)
    fetcher = build_fetcher(config, store)
    try:
        fetcher.warm(ref)
        interval = 2.0
        scrubber = Scrubber(store, list, ScrubConfig(interval_s=interval), stop=threading.Event())
        started = time.monotonic()
        result = scrubber.scrub_pass()
        elapsed = time.monotonic() - started
        assert result.complete and result.files == 4 and not result.problems
        total = 4 * MIB
        assert scrubber.rate == math.ceil(total / interval)
        # The bucket lets the first blob through at once and holds each next one until the
        # bytes before it fit under the rate: the pass takes at least 3/4 of the interval.
        assert elapsed >= 0.75 * interval * 0.99
        assert elapsed < interval + 10
        # Unpaced (interval 0) and fixed-rate passes keep their meaning.
        unpaced = Scrubber(store, list, ScrubConfig(interval_s=0), stop=threading.Event())
        unpaced.scrub_pass()
        assert unpaced.rate == 0
        fixed = Scrubber(store, list, ScrubConfig(bytes_per_s=123), stop=threading.Event())
        assert fixed.rate == 123
    finally:
        fetcher.close()
        store.close()
