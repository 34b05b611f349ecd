"""``weightcache demo``: the whole flow on this machine, with real local services only.

It starts a loopback registry and S3 endpoint, publishes one small model in every supported
format, warms each into a fresh store through the same code the node agent uses, shows the
store, lets bit rot hit a shard and shows one scrub pass finding the chunk and a repair fetching
only that chunk, mounts the model read-only into a pod's target through the CSI socket (as
root), and has the warm controller prefetch a model for an annotated Deployment seen through a
local API server. Every step is printed on stderr; the exit status is 0 only if every step did
what it should.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from weightcache.daemon.config import Config

if TYPE_CHECKING:
    from weightcache.daemon.fetcher import Fetcher
    from weightcache.daemon.store.store import Store


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo() -> int:
    from weightcache.daemon.config import FetchConfig, StoreConfig
    from weightcache.testing.models import ModelPublisher, publish_s3, sample_model, write_files
    from weightcache.testing.oci_push import RegistryPusher
    from weightcache.testing.services import ServiceUnavailable, run_registry, run_s3

    with tempfile.TemporaryDirectory(prefix="weightcache-demo-") as tmp:
        work = Path(tmp)
        files = sample_model(seed=42, shard_bytes=8 * 1024 * 1024, shards=4)
        total = sum(len(v) for v in files.values())
        _say(f"1. a demo model: {len(files)} files, {total / 2**20:.1f} MiB")
        local = write_files(work / "model", files)
        try:
            with run_registry(work / "registry") as registry, run_s3() as s3:
                _say(f"2. local services: registry {registry.url}, S3 endpoint {s3.url}")
                publisher = ModelPublisher(RegistryPusher(registry.url), work / "publish")
                publisher.workdir.mkdir()
                refs = {
                    "ORAS artifact": f"oci://{registry.host}/demo/llm:oras",
                    "KitOps ModelKit": f"oci://{registry.host}/demo/llm:kit",
                    "ModelPack (raw)": f"oci://{registry.host}/demo/llm:modelpack",
                    "ModelPack (tar+zstd)": f"oci://{registry.host}/demo/llm:modelpack-zstd",
                    "modelcar image": f"oci://{registry.host}/demo/llm:image",
                    "S3 prefix": "s3://demo/llm/v1/",
                    "local directory": f"file://{local}",
                }
                publisher.oras("demo/llm", "oras", files)
                publisher.modelkit("demo/llm", "kit", files, compression="gzip")
                publisher.modelpack("demo/llm", "modelpack", files)
                publisher.modelpack("demo/llm", "modelpack-zstd", files, "tar+zstd")
                publisher.image("demo/llm", "image", files)
                publish_s3(s3.client(), "demo", "llm/v1/", files)
                next_model = sample_model(seed=43, shard_bytes=4 * 1024 * 1024, shards=2)
                publisher.oras("demo/llm", "v2", next_model)
                _say("3. published the model in every supported format, and a v2 as ORAS")
                for key, value in s3.env().items():
                    os.environ[key] = value  # the S3 source reads the standard AWS chain
                config = Config(
                    # This machine's disk, not a GPU node's: no free-space reserve to keep.
                    store=StoreConfig(root=work / "store", reserve_fraction=0.0),
                    fetch=FetchConfig(part_bytes=4 * 1024 * 1024),
                )
                return _warm_and_check(config, refs, files, f"oci://{registry.host}/demo/llm:v2")
        except ServiceUnavailable as exc:
            _say(f"demo: {exc}")
            return 1


def _warm_and_check(
    config: Config, refs: dict[str, str], files: dict[str, bytes], next_ref: str
) -> int:
    from weightcache.app.wiring import build_fetcher
    from weightcache.daemon.references import parse_reference
    from weightcache.daemon.store.store import Store
    from weightcache.daemon.store.verify import verify_store

    store = Store(config.store)
    fetcher = build_fetcher(config, store)
    ok = True
    try:
        _say(f"4. warm each into a fresh store at {config.store.root}")
        digests = {}
        for name, ref in refs.items():
            started = time.monotonic()
            row = fetcher.warm(parse_reference(ref))
            tree = store.model_path(row.digest)
            same = all((tree / rel).read_bytes() == data for rel, data in files.items())
            ok &= same
            digests[name] = row.digest
            _say(
                f"   {name:22} {row.state} in {time.monotonic() - started:5.2f}s  "
                f"{row.digest[:19]}  files {'identical' if same else 'DIFFER'}"
            )
        blobs = sum(1 for p in store.layout.blobs.rglob("*") if p.is_file())
        _say(
            f"5. {len(store.models())} models held as {blobs} blobs "
            f"(identical files stored once; the tar formats also hold their directory entries)"
        )
        report = verify_store(store, full=True)
        _say(
            f"6. verify --full: {report.files} files, {report.bytes_hashed / 2**20:.0f} MiB "
            f"hashed: {'ok' if report.ok else 'PROBLEMS'}"
        )
        ok &= report.ok
        ok &= _rot_scrub_repair(store, fetcher, digests["ORAS artifact"], files)
        if os.geteuid() == 0:
            ok &= asyncio.run(_mount(config, store, fetcher, refs["ORAS artifact"], files))
        else:
            _say("10. CSI mounts skipped: bind mounts need root")
        ok &= _warm_controller(config, store, fetcher, next_ref)
    finally:
        fetcher.close()
        store.close()
    _say("demo: done" if ok else "demo: a step did not do what it should")
    return 0 if ok else 1


def _rot_scrub_repair(store: Store, fetcher: Fetcher, digest: str, files: dict[str, bytes]) -> bool:
    """Bit rot in one shard; one scrub pass finds the chunk; a repair fetches only that chunk."""
    import threading

    from weightcache.daemon.config import ScrubConfig
    from weightcache.daemon.repair import Repairer
    from weightcache.daemon.scrubber import Scrubber
    from weightcache.daemon.store.verify import Problem

    shard = sorted(p for p in files if p.endswith(".safetensors"))[1]
    path = store.model_path(digest) / shard
    st = os.stat(path)
    with open(path, "r+b") as f:  # one byte flips; size, inode and mtime stay
        f.seek(5 * 2**20)
        byte = f.read(1)[0]
        f.seek(5 * 2**20)
        f.write(bytes([byte ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    repairer = Repairer(store, fetcher)

    def quarantine(problems: Sequence[Problem]) -> None:  # the repair is shown as step 8
        repairer.damaged(problems, repair=False)

    scrubber = Scrubber(store, quarantine, ScrubConfig(bytes_per_s=0), stop=threading.Event())
    result = scrubber.scrub_pass()
    found = sorted({(p.path, p.bad_chunks) for p in result.problems})
    corrupt = sum(1 for m in store.models() if m.state == "corrupt")
    _say(
        f"7. bit rot in {shard} (size, inode and mtime untouched); one scrub pass over "
        f"{result.files} files ({result.seconds:.2f}s) found {found} (file, chunk); the file "
        f"is one blob shared by {corrupt} models, all now corrupt and refused to new mounts"
    )
    before = fetcher.repaired_bytes
    row = repairer.repair(digest).result()
    fetched = fetcher.repaired_bytes - before
    healed = (store.model_path(digest) / shard).read_bytes() == files[shard]
    size = len(files[shard])
    _say(
        f"8. repair by range: fetched {fetched / 2**20:.0f} MiB of the {size / 2**20:.0f} MiB "
        f"file; {row.state}, bytes identical to the source: {healed}; every model: "
        f"{sorted({m.state for m in store.models()})}"
    )
    every = sorted({m.state for m in store.models()})
    return found == [(shard, (1,))] and healed and row.state == "ready" and every == ["ready"]


async def _mount(
    config: Config, store: Store, fetcher: Fetcher, ref: str, files: dict[str, bytes]
) -> bool:
    """The CSI node plugin on a unix socket; a pod's inline volume published and unpublished."""
    import errno

    from weightcache.app.wiring import build_policy
    from weightcache.csi.client import NodeClient
    from weightcache.csi.identity import IdentityService
    from weightcache.csi.mounter import SystemMounter
    from weightcache.csi.node import NodeService, store_checks
    from weightcache.csi.server import start_node_server
    from weightcache.daemon.repair import Repairer

    root = config.store.root.parent
    endpoint = f"unix://{root}/csi/csi.sock"
    node = NodeService(
        "demo-node",
        store,
        fetcher,
        SystemMounter(),
        build_policy(config, fetcher.sources, fetcher.signatures),
        Repairer(store, fetcher),
        checks=store_checks(store),
        kubelet_dir=root / "kubelet",
        aliases=config.registry.aliases,
    )
    server = await start_node_server(endpoint, IdentityService(lambda: True), node)
    target = root / "kubelet/pods/demo-pod/volumes/kubernetes.io~csi/model/mount"
    try:
        async with NodeClient(endpoint) as client:
            started = time.perf_counter()
            await client.publish("demo-volume", target, {"model": ref, "verify": "fast"})
            took = (time.perf_counter() - started) * 1000
            same = all((target / rel).read_bytes() == data for rel, data in files.items())
            try:
                (target / "config.json").write_bytes(b"{}")
                read_only = False
            except OSError as exc:
                read_only = exc.errno in (errno.EROFS, errno.EACCES)
            _say(
                f"9. CSI NodePublishVolume over {endpoint}: mounted in {took:.1f} ms at "
                f"{target}; files identical: {same}; writing refused: {read_only}"
            )
            await client.unpublish("demo-volume", target)
            gone = not target.exists()
            _say(
                f"10. NodeUnpublishVolume: unmounted and removed: {gone}; pins left: "
                f"{len(store.pins())}"
            )
            return same and read_only and gone and not store.pins()
    finally:
        await server.stop(grace=None)


def _warm_controller(config: Config, store: Store, fetcher: Fetcher, ref: str) -> bool:
    """A Deployment annotated weightcache.io/warm, seen through a local API server that speaks
    the Kubernetes list/watch protocol: the node pins the model, labels itself, tells the
    workload."""
    from weightcache.app.wiring import build_policy
    from weightcache.daemon.kube.client import KubeClient
    from weightcache.daemon.kube.naming import WARM_ANNOTATION, label_key
    from weightcache.daemon.kube.warm import WarmController
    from weightcache.daemon.references import parse_reference
    from weightcache.testing.fake_kube import deployment, node, run_fake_kube

    key = label_key(parse_reference(ref))
    with run_fake_kube() as kube:
        kube.put(node("demo-node", labels={"gpu": "h100"}))
        kube.put(
            deployment(
                "llm", "team-a", annotations={WARM_ANNOTATION: ref}, node_selector={"gpu": "h100"}
            )
        )
        client = KubeClient(str(kube.kubeconfig(config.store.root.parent)), request_timeout_s=10)
        warm = WarmController(
            "demo-node",
            client,
            store,
            fetcher,
            config.warm,
            build_policy(config, fetcher.sources, fetcher.signatures),
            aliases=config.registry.aliases,
        )
        warm.start()
        try:
            told = kube.wait_until(
                lambda: any(e["reason"] == "WarmReady" for e in kube.objects("Event")), 60
            )
        finally:
            warm.stop()
            client.close()
        labels = (kube.get("Node", "", "demo-node") or {}).get("metadata", {}).get("labels", {})
        pins = [(k, h) for _, k, h in store.pins()]
        events = kube.objects("Event")
        ready = next((e["message"] for e in events if e["reason"] == "WarmReady"), "")
        _say(
            f"11. warm controller: Deployment team-a/llm (nodeSelector gpu=h100) is annotated "
            f"{WARM_ANNOTATION}: {ref}; this node fetched it before any pod arrived: "
            f"pins {pins}, node label {key}={labels.get(key)}, "
            f"events {sorted(e['reason'] for e in events)}: {ready}"
        )
        return told and labels.get(key) == "true" and pins == [("warm", "Deployment/team-a/llm")]
