"""Storm: 200 concurrent publish and unpublish calls on 10 targets and 3 models through the real
CSI socket and real bind mounts. Counted: leaked mounts (0) and pins that disagree with the
mount table afterwards (0)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from csi_harness import mountinfo_entries, publish, serving_node, unpublish
from helpers import make_config, report

from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.states import PinKind
from weightcache.testing.models import sample_model, write_files

SECTION = "reliability"
CALLS = 200
TARGETS = 10


def test_a_storm_on_ten_targets_and_three_models(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    refs = [f"file://{write_files(tmp_path / f'src{i}', sample_model(60 + i))}" for i in range(3)]
    targets = [tmp_path / "kubelet" / "pods" / f"p{i}" / "mount" for i in range(TARGETS)]
    rng = random.Random(2027)
    # Each target keeps one model (another model at a mounted target is ALREADY_EXISTS).
    model_of = {t: rng.choice(refs) for t in targets}
    plan = [(t := rng.choice(targets), rng.random() < 0.6, model_of[t]) for _ in range(CALLS)]

    async def main() -> tuple[int, int, int]:
        async with serving_node(tmp_path, make_config(tmp_path / "store")) as n:
            for ref in refs:
                await asyncio.to_thread(n.fetcher.warm, parse_reference(ref))
            calls = [
                n.stub.NodePublishVolume(publish(ref, t))
                if is_publish
                else n.stub.NodeUnpublishVolume(unpublish(t))
                for t, is_publish, ref in plan
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            digest_of = {
                ref: n.store.cached_model(str(parse_reference(ref))).digest  # type: ignore[union-attr]
                for ref in refs
            }
            pins = {(m, h) for m, k, h in n.store.pins() if k == PinKind.MOUNT}
            disagree = 0
            for t in targets:
                mounted = mountinfo_entries(t)
                expected = {(digest_of[model_of[t]], str(t))} if mounted else set()
                disagree += mounted > 1
                disagree += {p for p in pins if p[1] == str(t)} != expected
            await asyncio.gather(*(n.stub.NodeUnpublishVolume(unpublish(t)) for t in targets))
            leaked = sum(mountinfo_entries(t) for t in targets) + len(n.store.pins())
            return len(errors), disagree, leaked

    errors, disagree, leaked = asyncio.run(main())
    report(
        request.config,
        SECTION,
        f"storm: {CALLS} concurrent publish/unpublish on {TARGETS} targets, 3 models: failed "
        f"calls {errors}, pins disagreeing with the mount table {disagree}, leaked mounts and "
        f"pins after unpublishing all {leaked}",
    )
    assert (errors, disagree, leaked) == (0, 0, 0)
