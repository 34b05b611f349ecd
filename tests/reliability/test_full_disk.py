"""Full disk in the middle of a fetch, on a small filesystem made for the test: a clean error,
staging reclaimed, and the model the store already held intact and mountable."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from csi_harness import publish, serving_node, unpublish
from helpers import PART, make_config, models_dir_entries, read_tree, report, small_filesystem

from weightcache.daemon.config import PolicyConfig
from weightcache.daemon.errors import InsufficientSpace
from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.states import ModelState
from weightcache.daemon.store.verify import verify_store
from weightcache.testing.faultproxy import FaultProxy, Rule
from weightcache.testing.models import ModelPublisher, sample_model, write_files

SECTION = "reliability"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB filesystem of its own."""
    with small_filesystem(tmp_path / "small", "24m") as mount:
        yield mount


def test_a_disk_that_fills_mid_fetch_loses_nothing_else(
    proxy: FaultProxy,
    publisher: ModelPublisher,
    tmp_path: Path,
    small_fs: Path,
    request: pytest.FixtureRequest,
) -> None:
    held = sample_model(92, shard_bytes=PART, shards=2)
    held_ref = f"file://{write_files(tmp_path / 'held', held)}"
    publisher.oras("full/next", "v1", {"w.bin": os.urandom(8 * PART)})

    def fill() -> None:
        # Another tenant of the disk takes the space after the capacity check passed.
        vfs = os.statvfs(small_fs)
        (small_fs / "filler").write_bytes(b"\1" * (vfs.f_bavail * vfs.f_frsize - 512 * 1024))

    config = make_config(
        small_fs / "store",
        store={"reserve_fraction": 0.0},
        policy=PolicyConfig(file_roots=(tmp_path / "held",)),
    )
    (tmp_path / "node").mkdir()

    async def main() -> tuple[str, int, bool, bool]:
        # The node's socket beside, not inside, the small filesystem the test unmounts.
        async with serving_node(tmp_path / "node", config) as h:
            row = await asyncio.to_thread(h.fetcher.warm, parse_reference(held_ref))
            proxy.state.rules.append(
                Rule(r"/blobs/sha256:", range_from=2 * PART, before=fill, times=1)
            )
            with pytest.raises(InsufficientSpace) as exc:
                await asyncio.to_thread(
                    h.fetcher.warm, parse_reference(f"oci://{proxy.host}/full/next:v1")
                )
            partials = len(list((small_fs / "store" / "staging").glob("*.part")))
            intact = verify_store(h.store, full=True).ok
            target = small_fs / "kubelet" / "pods" / "p" / "mount"
            await h.stub.NodePublishVolume(publish(held_ref, target))
            mountable = read_tree(target) == held
            await h.stub.NodeUnpublishVolume(unpublish(target))
            assert h.store.model(row.digest).state == ModelState.READY  # type: ignore[union-attr]
            assert models_dir_entries(small_fs / "store") == [row.digest.removeprefix("sha256:")]
            return str(exc.value), partials, intact, mountable

    message, partials, intact, mountable = asyncio.run(main())
    report(
        request.config,
        SECTION,
        f"full disk mid-fetch: error {message.split(' oci://')[0]!r}, partial files left "
        f"{partials}, the held model intact {intact} and mountable {mountable}",
    )
    assert "disk full while fetching" in message
    assert partials == 0 and intact and mountable
