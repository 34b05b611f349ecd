"""The scrubber against real damage on a real store: flipped bytes, a truncated file, a file
replaced behind the store's back, a deleted file, and a source that is gone when the repair is
needed. Repairs fetch only the damaged chunks (counted at the proxy in front of the registry)."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from csi_harness import NodeHarness, publish, quarantining_scrubber, serving_node
from helpers import PART, flip_byte, make_config, read_tree

from weightcache.app.node_agent import _node_event_poster
from weightcache.daemon.config import ScrubConfig
from weightcache.daemon.errors import RepairFailed
from weightcache.daemon.kube.client import KubeClient
from weightcache.daemon.metrics import Metrics
from weightcache.daemon.references import parse_reference
from weightcache.daemon.repair import Repairer
from weightcache.daemon.scrubber import Scrubber
from weightcache.daemon.store.states import ModelState
from weightcache.daemon.store.verify import check_model
from weightcache.testing.fake_kube import node, run_fake_kube
from weightcache.testing.faultproxy import FaultProxy
from weightcache.testing.models import ModelPublisher, sample_model, write_files

SHARD = 3 * PART + 1000  # four chunks, the last one short


async def _refused(h: NodeHarness, ref: str, target: Path) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await h.stub.NodePublishVolume(publish(ref, target, fetch="CachedOnly"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    return exc.value.details() or ""


@pytest.fixture
def oras_model(
    proxy: FaultProxy, publisher: ModelPublisher, request: pytest.FixtureRequest
) -> Iterator[tuple[str, dict[str, bytes]]]:
    files = sample_model(31, shard_bytes=SHARD, shards=3)
    repo = f"scrub/{request.node.name.split('[')[0].replace('_', '-')}"
    publisher.oras(repo, "v1", files)
    yield f"oci://{proxy.host}/{repo}:v1", files


def test_flipped_bytes_are_found_in_one_pass_refused_and_repaired_by_range(
    tmp_path: Path, proxy: FaultProxy, oras_model: tuple[str, dict[str, bytes]]
) -> None:
    ref, files = oras_model
    rng = random.Random(5)
    shards = sorted(p for p in files if p.endswith(".safetensors"))
    victims = {p: rng.randrange(len(files[p])) for p in rng.sample(shards, 2)}

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as h:
            row = await asyncio.to_thread(h.fetcher.warm, parse_reference(ref))
            tree = h.store.model_path(row.digest)
            for rel, offset in victims.items():
                flip_byte(tree / rel, offset)
            proxy.state.reset()
            repairs: list[str] = []
            metrics = Metrics()
            metrics.watch(h.store, scrub=None)
            scrubber = quarantining_scrubber(h, repairs, metrics=metrics)
            result = await asyncio.to_thread(scrubber.scrub_pass)
            assert {(p.path, p.bad_chunks) for p in result.problems} == {
                (rel, (offset // PART,)) for rel, offset in victims.items()
            }
            assert scrubber.stats.failures == 2 and scrubber.stats.passes == 1
            value = metrics.registry.get_sample_value
            assert value("weightcache_verify_failures_total") == 2
            assert value("weightcache_models", {"state": "corrupt"}) == 1
            assert value("weightcache_verify_bytes_total") == sum(map(len, files.values()))
            assert repairs == [row.digest, row.digest]
            # Refused, naming the file, until repaired.
            msg = await _refused(h, ref, tmp_path / "kubelet" / "early")
            assert any(rel in msg for rel in victims)
            healed = await asyncio.to_thread(lambda: h.repairer.repair(row.digest).result())
            assert healed.state == ModelState.READY
            assert read_tree(h.store.model_path(row.digest)) == files
            # Only the two damaged chunks crossed the network.
            assert proxy.state.blob_bytes_relayed == 2 * PART
            assert h.fetcher.repaired_bytes == 2 * PART
            await h.stub.NodePublishVolume(publish(ref, tmp_path / "kubelet" / "t"))
            assert read_tree(tmp_path / "kubelet" / "t") == files
            # The next pass finds nothing, and starts with what was verified longest ago.
            order = [sha for sha, _ in h.store.scrub_order()]
            stamps = [h.store.blob_row(sha).verified_at for sha in order]  # type: ignore[union-attr]
            assert len(order) == len(files) and stamps == sorted(stamps)
            again = await asyncio.to_thread(scrubber.scrub_pass)
            assert again.problems == [] and again.files == len(files)

    asyncio.run(main())


def test_a_truncated_file_fetches_only_its_tail(
    tmp_path: Path, proxy: FaultProxy, oras_model: tuple[str, dict[str, bytes]]
) -> None:
    ref, files = oras_model
    victim = sorted(p for p in files if p.endswith(".safetensors"))[0]

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as h:
            row = await asyncio.to_thread(h.fetcher.warm, parse_reference(ref))
            os.truncate(h.store.model_path(row.digest) / victim, 2 * PART)
            proxy.state.reset()
            result = await asyncio.to_thread(quarantining_scrubber(h).scrub_pass)
            assert [(p.path, p.bad_chunks) for p in result.problems] == [(victim, (2, 3))]
            await asyncio.to_thread(lambda: h.repairer.repair(row.digest).result())
            assert read_tree(h.store.model_path(row.digest)) == files
            assert proxy.state.blob_bytes_relayed == SHARD - 2 * PART

    asyncio.run(main())


def test_replaced_and_deleted_files(tmp_path: Path) -> None:
    files = sample_model(32, shard_bytes=SHARD, shards=2)
    ref = f"file://{write_files(tmp_path / 'src', files)}"
    replaced, deleted = sorted(p for p in files if p.endswith(".safetensors"))

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as h:
            row = await asyncio.to_thread(h.fetcher.warm, parse_reference(ref))
            tree = h.store.model_path(row.digest)
            # Another file of the same size and mtime moved over the original: a new inode.
            st = os.stat(tree / replaced)
            impostor = tmp_path / "impostor"
            impostor.write_bytes(bytes(len(files[replaced])))
            os.utime(impostor, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.chmod(tree / Path(replaced).parent, 0o755)
            os.replace(impostor, tree / replaced)
            os.chmod(tree / Path(replaced).parent, 0o555)
            fast = check_model(h.store, row.digest, full=False)
            assert [(p.path, p.reason) for p in fast.problems] == [
                (replaced, "inode changed (file replaced)")
            ]
            full = check_model(h.store, row.digest, full=True)
            assert [p.path for p in full.problems] == [replaced]
            assert "content differs" in full.problems[0].reason
            # Both modes catch a replacement; only full (and the scrubber) catch rot in place.
            os.chmod(tree, 0o755)
            os.unlink(tree / deleted)
            os.chmod(tree, 0o555)
            result = await asyncio.to_thread(quarantining_scrubber(h).scrub_pass)
            assert sorted((p.path, p.reason) for p in result.problems) == sorted(
                [(deleted, "file is missing"), (replaced, "inode changed (file replaced)")]
            )
            msg = await _refused(h, ref, tmp_path / "kubelet" / "t")
            assert replaced in msg or deleted in msg
            healed = await asyncio.to_thread(lambda: h.repairer.repair(row.digest).result())
            assert healed.state == ModelState.READY and read_tree(tree) == files
            assert h.fetcher.repaired_bytes == 0  # the blobs were intact: relinked, not fetched

    asyncio.run(main())


def test_a_source_that_is_gone_leaves_the_model_corrupt_with_the_reason(tmp_path: Path) -> None:
    files = sample_model(33, shard_bytes=SHARD, shards=2)
    src = write_files(tmp_path / "src", files)
    ref = f"file://{src}"
    victim = sorted(p for p in files if p.endswith(".safetensors"))[0]

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as h:
            row = await asyncio.to_thread(h.fetcher.warm, parse_reference(ref))
            flip_byte(h.store.model_path(row.digest) / victim, 10)
            os.rename(src, tmp_path / "moved-away")
            await asyncio.to_thread(quarantining_scrubber(h).scrub_pass)
            with pytest.raises(Exception) as exc:
                await asyncio.to_thread(lambda: h.repairer.repair(row.digest).result())
            after = h.store.model(row.digest)
            assert after is not None and after.state == ModelState.CORRUPT
            # The damage and why the repair failed, as data.
            assert victim in after.error and "content differs" in after.error
            assert after.repair_error == str(exc.value) and after.repair_reason == "not_found"
            msg = await _refused(h, ref, tmp_path / "kubelet" / "t")
            assert "repair failed" in msg and victim in msg
            # Asked again at once (a kubelet retry): the failure is answered from memory.
            again = h.repairer.repair(row.digest)
            failure = again.exception()
            assert again.done() and isinstance(failure, RepairFailed)
            assert str(failure) == str(exc.value) and failure.reason == "not_found"
            # The source is back and the model is warmed whole: that memory is gone with it.
            os.rename(tmp_path / "moved-away", src)
            healed = await asyncio.to_thread(h.fetcher.warm, parse_reference(ref))
            assert healed.state == ModelState.READY
            flip_byte(h.store.model_path(row.digest) / victim, 20)
            await asyncio.to_thread(quarantining_scrubber(h).scrub_pass)
            repaired = await asyncio.to_thread(lambda: h.repairer.repair(row.digest).result())
            assert repaired.state == ModelState.READY

    asyncio.run(main())


def test_damage_is_reported_as_an_event_on_the_node(tmp_path: Path) -> None:
    files = sample_model(34, shard_bytes=SHARD, shards=1)
    ref = f"file://{write_files(tmp_path / 'src', files)}"
    victim = next(p for p in files if p.endswith(".safetensors"))

    async def main() -> None:
        with run_fake_kube() as kube:
            kube.put(node("gpu-1"))
            client = KubeClient(str(kube.kubeconfig(tmp_path)), request_timeout_s=10)
            async with serving_node(tmp_path, make_config(tmp_path / "store")) as h:
                row = await asyncio.to_thread(h.fetcher.warm, parse_reference(ref))
                flip_byte(h.store.model_path(row.digest) / victim, PART + 7)
                poster = _node_event_poster(client, "gpu-1")
                scrubber = quarantining_scrubber(
                    h, [], Repairer(h.store, h.fetcher, on_damage=poster)
                )
                await asyncio.to_thread(scrubber.scrub_pass)
            client.close()
            (event,) = kube.objects("Event")
            assert event["involvedObject"]["kind"] == "Node"
            assert event["involvedObject"]["name"] == "gpu-1"
            assert (event["reason"], event["type"]) == ("ModelCorrupt", "Warning")
            assert victim in event["message"] and row.digest in event["message"]

    asyncio.run(main())


def test_a_stopped_scrub_passes_no_verdict(tmp_path: Path) -> None:
    victim = "w.bin"
    files = {victim: random.Random(35).randbytes(SHARD)}  # one file of four chunks
    ref = f"file://{write_files(tmp_path / 'src', files)}"

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as h:
            row = await asyncio.to_thread(h.fetcher.warm, parse_reference(ref))
            flip_byte(h.store.model_path(row.digest) / victim, 3 * PART + 5)  # the last chunk
            stop = threading.Event()
            ticks = itertools.count()

            def clock() -> float:
                # Readings: the limiter's start, the pass's start, then the first chunk's read:
                # the stop arrives inside the damaged file, before its last chunk is read.
                if next(ticks) == 2:
                    stop.set()
                return 0.0

            scrubber = Scrubber(
                h.store, [].append, ScrubConfig(bytes_per_s=PART), stop=stop, clock=clock
            )
            result = await asyncio.to_thread(scrubber.scrub_pass)
            assert not result.complete and result.files == 1
            assert scrubber.stats.passes == 0 and scrubber.stats.failures == 0
            # Nothing was recorded as verified: a remembered full check still hashes and finds it.
            check = check_model(h.store, row.digest, full=True, remembered=True)
            assert [p.path for p in check.problems] == [victim]

    asyncio.run(main())
