"""Corruption: random byte flips across the store, sizes and mtimes kept, under a pod's real
read-only bind mount. Counted: the share of damaged files found in one scrub pass (100%),
corrupt bytes served to a new publish (0), the share healed (100%), and what a reader holding
the mount sees after the scrub: only files that are correct or absent."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest
from csi_harness import publish, quarantining_scrubber, serving_node, unpublish
from helpers import PART, flip_byte, make_config, read_tree, report

from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.states import ModelState
from weightcache.testing.models import write_files

SECTION = "reliability"


def _seen(target: Path, files: dict[str, bytes]) -> tuple[int, int]:
    """(files correct or absent, files present with other bytes) through a mount."""
    good = bad = 0
    for rel, data in files.items():
        path = target / rel
        if not path.exists() or path.read_bytes() == data:
            good += 1
        else:
            bad += 1
    return good, bad


def test_random_flips_are_found_refused_and_healed(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    flips = request.config.getoption("--flips")
    rng = random.Random(7)
    files = {f"shard-{i:03d}.bin": rng.randbytes(rng.randint(1, 3) * PART + 17) for i in range(24)}
    ref = f"file://{write_files(tmp_path / 'src', files)}"

    async def main() -> dict[str, int]:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as h:
            row = await asyncio.to_thread(h.fetcher.warm, parse_reference(ref))
            tree = h.store.model_path(row.digest)
            holder = tmp_path / "kubelet" / "pods" / "reader" / "mount"
            await h.stub.NodePublishVolume(publish(ref, holder))
            damaged: set[str] = set()
            for _ in range(flips):
                rel = rng.choice(sorted(files))
                flip_byte(tree / rel, rng.randrange(len(files[rel])))
                damaged.add(rel)
            scrubber = quarantining_scrubber(h)
            result = await asyncio.to_thread(scrubber.scrub_pass)
            found = {p.path for p in result.problems}
            _, bad_after_scrub = _seen(holder, files)
            # A new publish is refused while the model is corrupt: no corrupt byte is served.
            served_corrupt = 0
            try:
                await h.stub.NodePublishVolume(
                    publish(
                        ref, tmp_path / "kubelet" / "pods" / "new" / "mount", fetch="CachedOnly"
                    )
                )
                served_corrupt = _seen(tmp_path / "kubelet" / "pods" / "new" / "mount", files)[1]
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            healed_row = await asyncio.to_thread(lambda: h.repairer.repair(row.digest).result())
            assert healed_row.state == ModelState.READY
            healed = sum(read_tree(holder).get(rel) == files[rel] for rel in damaged)
            good_after_repair, bad_after_repair = _seen(holder, files)
            await h.stub.NodeUnpublishVolume(unpublish(holder))
            return {
                "damaged": len(damaged),
                "found": len(found & damaged),
                "false": len(found - damaged),
                "served": served_corrupt,
                "healed": healed,
                "bad_after_scrub": bad_after_scrub,
                "bad_after_repair": bad_after_repair,
                "good_after_repair": good_after_repair,
            }

    f = asyncio.run(main())
    report(
        request.config,
        SECTION,
        f"corruption: {flips} byte flips hit {f['damaged']} files: found in one scrub pass "
        f"{f['found']}/{f['damaged']} ({100 * f['found'] // max(f['damaged'], 1)}%), false "
        f"alarms {f['false']}, corrupt bytes served to a new publish {f['served']}, healed "
        f"{f['healed']}/{f['damaged']}, files wrong through the reader's mount after the scrub "
        f"{f['bad_after_scrub']}, after the repair {f['bad_after_repair']}",
    )
    assert f["found"] == f["damaged"] and f["false"] == 0
    assert f["served"] == 0 and f["healed"] == f["damaged"]
    assert f["bad_after_scrub"] == 0 and f["bad_after_repair"] == 0
    assert f["good_after_repair"] == len(files)
