"""Live pods never notice a repair: a file quarantined under a real read-only bind mount comes
back at its path inside the very directory the pod holds, and every file that was never
damaged stays readable throughout, through the same descriptors and mmaps."""

from __future__ import annotations

import asyncio
import mmap
import os
from pathlib import Path
from typing import BinaryIO

from csi_harness import publish, quarantining_scrubber, serving_node
from helpers import PART, flip_byte, make_config, read_tree

from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.states import ModelState
from weightcache.testing.models import sample_model, write_files


def _hold(path: Path) -> tuple[BinaryIO, mmap.mmap]:
    """An open file and an mmap of it, as an inference server keeps its weights."""
    held = open(path, "rb")  # noqa: SIM115 - kept open across the repair by the caller
    return held, mmap.mmap(held.fileno(), 0, prot=mmap.PROT_READ)


def test_a_repair_heals_the_tree_a_running_pod_has_mounted(tmp_path: Path) -> None:
    files = sample_model(90, shard_bytes=4 * PART, shards=3)
    ref = f"file://{write_files(tmp_path / 'src', files)}"
    shards = sorted(p for p in files if p.endswith(".safetensors"))
    intact, victim = shards[0], shards[1]

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as h:
            row = await asyncio.to_thread(h.fetcher.warm, parse_reference(ref))
            target = tmp_path / "kubelet" / "pods" / "p" / "mount"
            await h.stub.NodePublishVolume(publish(ref, target))
            tree_inode = os.stat(target).st_ino
            # The pod holds an open file and an mmap of a shard that will stay intact.
            held, mapped = _hold(target / intact)
            first = held.read(PART)
            # Bit rot in another shard (size, inode and mtime kept), found by one scrub pass.
            flip_byte(h.store.model_path(row.digest) / victim, PART + 3)
            scrubber = quarantining_scrubber(h)
            result = await asyncio.to_thread(scrubber.scrub_pass)
            assert [p.path for p in result.problems] == [victim]
            assert not (target / victim).exists()  # gone from the pod's view, never corrupt
            assert (target / intact).read_bytes() == files[intact]
            healed = await asyncio.to_thread(lambda: h.repairer.repair(row.digest).result())
            assert healed.state == ModelState.READY
            # Through the pod's mount: the same directory, every file right, the healed one back.
            assert os.stat(target).st_ino == tree_inode
            assert read_tree(target) == files
            assert held.read() == files[intact][PART:] and first == files[intact][:PART]
            assert mapped[:] == files[intact]
            mapped.close()
            held.close()
            # Read-only as before: the healed directories were sealed again.
            assert oct(os.stat(h.store.model_path(row.digest)).st_mode & 0o777) == "0o555"

    asyncio.run(main())
