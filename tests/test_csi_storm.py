"""200 concurrent publish and unpublish calls on 10 targets, with real bind mounts: calls on one
target are serialised, so the kernel's mount table and the index's pins agree afterwards."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from csi_harness import mountinfo_entries, publish, serving_node, unpublish
from helpers import make_config

from weightcache.daemon.references import parse_reference
from weightcache.testing.models import sample_model, write_files

CALLS = 200
TARGETS = 10


def test_publish_unpublish_storm(tmp_path: Path) -> None:
    ref = f"file://{write_files(tmp_path / 'src', sample_model(11))}"
    targets = [tmp_path / "kubelet" / "pods" / f"p{i}" / "mount" for i in range(TARGETS)]
    rng = random.Random(2026)
    plan = [(rng.choice(targets), rng.random() < 0.6) for _ in range(CALLS)]

    async def main() -> None:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            digest = n.store.models()[0].digest
            calls = [
                n.stub.NodePublishVolume(publish(ref, t))
                if is_publish
                else n.stub.NodeUnpublishVolume(unpublish(t))
                for t, is_publish in plan
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert errors == [], errors[:3]
            pinned = {h for m, k, h in n.store.pins() if k == "mount" and m == digest}
            for t in targets:
                mounted = mountinfo_entries(t)
                assert mounted in (0, 1), f"{t} is mounted {mounted} times"
                assert (mounted == 1) == (str(t) in pinned), t
                if mounted:
                    assert sorted(p.name for p in t.iterdir()) == sorted(
                        {rel.split("/")[0] for rel in sample_model(11)}
                    )
            assert pinned <= {str(t) for t in targets}
            assert any(mountinfo_entries(t) for t in targets)  # the storm left some mounted
            await asyncio.gather(*(n.stub.NodeUnpublishVolume(unpublish(t)) for t in targets))
            assert [t for t in targets if mountinfo_entries(t)] == []
            assert n.store.pins() == []
            assert n.node._locks == {}  # no lock outlives its last caller

    asyncio.run(main())
