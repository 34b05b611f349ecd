"""Checks before mounting: ``verify: fast`` (size, inode, mtime) and ``verify: full`` (content,
remembered until the file changes). A failed check refuses the mount naming the file,
quarantines it and starts the repair; the kubelet's retry then mounts the repaired model."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from csi_harness import mountinfo_entries, publish, serving_node, unpublish
from helpers import make_config, read_tree

from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.states import ModelState
from weightcache.daemon.store.verify import check_model
from weightcache.testing.models import sample_model, write_files


def _flip_keeping_metadata(path: Path, offset: int) -> None:
    """Bit rot: the bytes change, the inode, size and mtime do not."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def _refused(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call  # type: ignore[misc]
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.value.details()
    return exc.value.details() or ""


def test_fast_check_refuses_a_rewritten_file_and_the_repair_mounts(tmp_path: Path) -> None:
    files = sample_model(21)
    ref = f"file://{write_files(tmp_path / 'src', files)}"
    victim = sorted(files)[0]

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            row = await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            tree_file = n.store.model_path(row.digest) / victim
            os.utime(tree_file, ns=(1, 1))  # rewritten: mtime differs from the record
            msg = await _refused(n.stub.NodePublishVolume(publish(ref, tmp_path / "kubelet" / "t")))
            assert victim in msg and "mtime changed" in msg and "quarantined" in msg
            assert (
                mountinfo_entries(tmp_path / "kubelet" / "t") == 0
                and not (tmp_path / "kubelet" / "t").exists()
            )
            assert n.store.pins() == []
            # The repair was started by the refusal; joining it waits for it to finish.
            healed = await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            assert healed.state == ModelState.READY
            await n.stub.NodePublishVolume(publish(ref, tmp_path / "kubelet" / "t"))
            assert read_tree(tmp_path / "kubelet" / "t") == files

    asyncio.run(main())


def test_full_check_catches_what_fast_cannot(tmp_path: Path) -> None:
    files = sample_model(22)
    ref = f"file://{write_files(tmp_path / 'src', files)}"
    victim = "model-00002-of-00003.safetensors"

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            row = await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            _flip_keeping_metadata(n.store.model_path(row.digest) / victim, 1000)
            last_fetch = n.fetcher.progress(row.digest)
            # fast trusts unchanged metadata: the continuous scrubber is what finds bit rot.
            await n.stub.NodePublishVolume(
                publish(ref, tmp_path / "kubelet" / "fast", verify="fast")
            )
            await n.stub.NodeUnpublishVolume(unpublish(tmp_path / "kubelet" / "fast"))
            msg = await _refused(
                n.stub.NodePublishVolume(
                    publish(ref, tmp_path / "kubelet" / "full", verify="full", fetch="CachedOnly")
                )
            )
            assert victim in msg and "content differs in 1 chunk" in msg
            assert n.store.model(row.digest).state == ModelState.CORRUPT  # type: ignore[union-attr]
            # CachedOnly starts no repair: the model stays corrupt and is refused.
            msg = await _refused(
                n.stub.NodePublishVolume(
                    publish(ref, tmp_path / "kubelet" / "again", fetch="CachedOnly")
                )
            )
            assert "failed a re-check" in msg and victim in msg
            assert n.fetcher.progress(row.digest) == last_fetch
            assert n.store.model(row.digest).state == ModelState.CORRUPT  # type: ignore[union-attr]

    asyncio.run(main())


def test_full_results_are_remembered_until_the_file_changes(tmp_path: Path) -> None:
    ref = f"file://{write_files(tmp_path / 'src', sample_model(23))}"

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            row = await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            first = check_model(n.store, row.digest, full=True, remembered=True)
            second = check_model(n.store, row.digest, full=True, remembered=True)
            assert first.problems == second.problems == []
            assert first.bytes_hashed == row.size and second.bytes_hashed == 0
            # A file whose metadata changed is re-hashed (and its good bytes accepted).
            some = next(iter(n.store.index.model_files(row.digest)))[0]
            os.utime(n.store.model_path(row.digest) / some, ns=(5, 5))
            third = check_model(n.store, row.digest, full=True, remembered=True)
            assert third.problems == [] and 0 < third.bytes_hashed < row.size
            # Without memory (the CLI's `verify --full`), everything is hashed again.
            assert check_model(n.store, row.digest, full=True).bytes_hashed == row.size

    asyncio.run(main())
