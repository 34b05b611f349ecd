"""Publish latency of a cached model through the CSI socket, beside copying the model.

    .venv/bin/python bench/publish_latency.py          # 1 GiB / 8 files and 64 GiB / 256 files
    .venv/bin/python bench/publish_latency.py --small-gib 0.01 --large-gib 0.05 \\
        --small-files 2 --large-files 8 --calls 20     # a smoke run

Runs as root with the real pieces: a Store in a temp dir, a NodeService served by
``start_server`` on a unix socket, ``SystemMounter`` bind mounts, and the client calling
NodePublishVolume through ``csi_pb2_grpc.NodeStub`` over grpc.aio, as the kubelet does.

The two models are built into the store without a network fetch and without writing their
bytes: each file is sparse (truncated to size, a few unique bytes at its start so none dedupe),
fingerprinted with the fetcher's own StreamHasher (sha256 + xxh3, reading the holes), and
committed through the store's ingest transaction, as the fetcher does (commit, install,
remember). ``Fetcher.warm`` is not used: it would write every zero.

For each model, ``--calls`` publishes to distinct new target paths (timed one by one on the
client side), then as many unpublishes. Then the loaded case: the same node service publishes
the small model again while its own fetcher fetches another model (``--load-files`` x
``--load-mib``, an ORAS artifact in the loopback registry) at full speed; only the publishes
that finished while that fetch ran count, and the fetch's own rate is shown beside its rate
alone, so the load is known to be real. Beside them:
  cp -r + sync        a real (non-sparse) copy of the small model's bytes, page cache dropped:
                      what an init container that copies the model costs at best
  the large model's copy, extrapolated at the measured copy rate (not copied: no disk for it)
  network floor       model bytes / 10 Gbit/s, what an init-container download costs at least
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MB, drop_caches, measure, output_arguments, say

from weightcache.app.wiring import build_fetcher, build_policy
from weightcache.csi.mounter import SystemMounter
from weightcache.csi.node import NodeService, store_checks
from weightcache.csi.server import start_server
from weightcache.daemon.config import Config, CsiConfig, PolicyConfig, StoreConfig
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.hashing import Fingerprint, StreamHasher
from weightcache.daemon.plan import listing_digest
from weightcache.daemon.references import parse_reference
from weightcache.daemon.repair import Repairer
from weightcache.daemon.store.states import Access, ModelState, Trust
from weightcache.daemon.store.store import Store
from weightcache.proto import csi_pb2, csi_pb2_grpc
from weightcache.testing.models import ModelPublisher
from weightcache.testing.oci_push import RegistryPusher
from weightcache.testing.services import run_registry

GIB = 1024**3
NETWORK_FLOOR_BPS = 1.25e9
"""10 Gbit/s in bytes per second."""
TARGET_P99_MS = 20.0
MOUNT_CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)


@dataclass(frozen=True)
class Model:
    key: str
    """``small`` or ``large``: names its source dir, volume ids and target paths."""
    label: str
    ref: str
    digest: str
    nbytes: int
    files: int


@dataclass(frozen=True)
class Latency:
    name: str
    samples_ms: list[float]

    def pct(self, q: float) -> float:
        """Nearest-rank percentile."""
        ordered = sorted(self.samples_ms)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    def row(self) -> dict[str, object]:
        return {
            "name": self.name,
            "calls": len(self.samples_ms),
            "p50_ms": self.pct(50),
            "p99_ms": self.pct(99),
            "max_ms": max(self.samples_ms),
        }


@dataclass(frozen=True)
class Timed:
    """One duration: a measured or extrapolated copy, or a computed floor."""

    name: str
    seconds: float
    nbytes: int
    note: str


# -- building models in the store ------------------------------------------------------------


def file_sizes(total: int, files: int) -> list[int]:
    per = total // files
    return [per] * (files - 1) + [total - per * (files - 1)]


def fingerprint(path: Path, chunk_size: int) -> Fingerprint:
    """The fetcher's fingerprint of a file's content (sha256, xxh3, per-chunk xxh3)."""
    hasher = StreamHasher(chunk_size=chunk_size)
    buf = mmap.mmap(-1, chunk_size)
    view = memoryview(buf)
    try:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                hasher.update(view[:n])
            # A real fetch writes with O_DIRECT and leaves the page cache alone; reading the
            # holes here fills it with zero pages, so hand them back.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        view.release()
        buf.close()
    return hasher.finish()


def build_model(store: Store, src: Path, key: str, nbytes: int, files: int, part: int) -> Model:
    """Sparse files in ``src``, committed into the store as the fetcher commits a download."""
    src.mkdir(parents=True)
    paths: list[Path] = []
    for i, size in enumerate(file_sizes(nbytes, files)):
        path = src / f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        head = f"{key} {i} ".encode() + os.urandom(16)
        with path.open("wb") as f:
            f.write(head[:size])
            f.truncate(size)
        paths.append(path)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        fps = list(pool.map(lambda p: fingerprint(p, part), paths))
    listing = [(p.name, fp.size, fp.sha256) for p, fp in zip(paths, fps, strict=True)]
    digest = listing_digest(listing)
    ref = f"file://{src}"
    with store.ingest(digest, ref, "file", nbytes, Access.ANONYMOUS, Trust.DIGEST) as ingest:
        for path, fp in zip(paths, fps, strict=True):
            # The store's staging is on the same filesystem: a hard link stands for the download.
            staged = store.temp_path("bench")
            os.link(path, staged)
            ingest.commit(staged, fp, path.name, expected=fp.sha256)
        ingest.install({p.name for p in paths})
    store.remember(ref, digest)
    row = store.model(digest)
    assert row is not None and row.state == ModelState.READY and store.resolve_cached(ref) == digest
    return Model(key, size_label(nbytes, files), ref, digest, nbytes, files)


def disk_usage(root: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of the regular files under ``root``, each inode once."""
    seen: set[int] = set()
    apparent = allocated = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def write_real(dst: Path, nbytes: int, files: int) -> None:
    """Non-sparse files of incompressible-looking data (a random block, varied per block)."""
    dst.mkdir(parents=True)
    block = bytearray(os.urandom(16 * 1024 * 1024))
    counter = 0
    for i, size in enumerate(file_sizes(nbytes, files)):
        with (dst / f"model-{i + 1:05d}-of-{files:05d}.safetensors").open("wb") as f:
            left = size
            while left:
                counter += 1
                block[:8] = counter.to_bytes(8, "big")
                n = min(len(block), left)
                f.write(memoryview(block)[:n])
                left -= n


# -- the CSI calls ---------------------------------------------------------------------------


def publish_request(model: Model, target: Path, n: int) -> csi_pb2.NodePublishVolumeRequest:
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=f"csi-bench-{model.key}-{n}",
        target_path=str(target),
        volume_capability=MOUNT_CAP,
        readonly=False,
        volume_context={"model": model.ref, "verify": "fast"},
    )


def unpublish_request(model: Model, target: Path, n: int) -> csi_pb2.NodeUnpublishVolumeRequest:
    return csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=f"csi-bench-{model.key}-{n}", target_path=str(target)
    )


def pod_target(pods: Path, model: Model, n: int) -> Path:
    """A kubelet-shaped target path; like the kubelet, its parent exists before the call."""
    parent = pods / f"{model.key}-{n:05d}" / "volumes" / "kubernetes.io~csi" / "model"
    parent.mkdir(parents=True)
    return parent / "mount"


async def time_calls(
    stub: csi_pb2_grpc.NodeStub, model: Model, pods: Path, calls: int
) -> tuple[Latency, Latency]:
    # One untimed pair first: the channel connects and the code paths warm up, as on a node
    # whose plugin has been serving for a while.
    warm = pod_target(pods, model, 0)
    await stub.NodePublishVolume(publish_request(model, warm, 0))
    await stub.NodeUnpublishVolume(unpublish_request(model, warm, 0))
    targets = [pod_target(pods, model, n) for n in range(1, calls + 1)]
    pub: list[float] = []
    for n, target in enumerate(targets, 1):
        started = time.perf_counter()
        await stub.NodePublishVolume(publish_request(model, target, n))
        pub.append((time.perf_counter() - started) * 1000)
    mounted = SystemMounter().mounts()
    missing = [t for t in targets if str(t) not in mounted]
    assert not missing, f"{len(missing)} targets are not mounted, e.g. {missing[0]}"
    unpub: list[float] = []
    for n, target in enumerate(targets, 1):
        started = time.perf_counter()
        await stub.NodeUnpublishVolume(unpublish_request(model, target, n))
        unpub.append((time.perf_counter() - started) * 1000)
    return (
        Latency(f"NodePublishVolume, {model.label}", pub),
        Latency(f"NodeUnpublishVolume, {model.label}", unpub),
    )


async def serve_and_measure(
    node: NodeService, endpoint: str, models: list[Model], pods: Path, calls: int
) -> list[Latency]:
    server = await start_server(
        endpoint, [lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s)]
    )
    try:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = csi_pb2_grpc.NodeStub(channel)
            out: list[Latency] = []
            for model in models:
                out += await time_calls(stub, model, pods, calls)
            return out
    finally:
        await server.stop(grace=None)


async def measure_under_load(
    node: NodeService,
    fetcher: Fetcher,
    endpoint: str,
    model: Model,
    pods: Path,
    calls: int,
    load_ref: str,
) -> tuple[Latency, float, float]:
    """Publishes of ``model`` while the node's fetcher fetches ``load_ref``: the latencies of
    the calls that finished before the fetch did, and the fetch's seconds and bytes."""
    server = await start_server(
        endpoint, [lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s)]
    )
    try:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            stub = csi_pb2_grpc.NodeStub(channel)
            warm = pod_target(pods, model, 0)
            await stub.NodePublishVolume(publish_request(model, warm, 0))
            await stub.NodeUnpublishVolume(unpublish_request(model, warm, 0))
            targets = [pod_target(pods, model, n) for n in range(1, calls + 1)]
            started = time.perf_counter()
            fetch = fetcher.warm_async(parse_reference(load_ref))
            samples: list[float] = []
            for n, target in enumerate(targets, 1):
                if fetch.done():
                    break
                t0 = time.perf_counter()
                await stub.NodePublishVolume(publish_request(model, target, n))
                if not fetch.done():
                    samples.append((time.perf_counter() - t0) * 1000)
            row = await asyncio.wrap_future(fetch)
            took = time.perf_counter() - started
            for n, target in enumerate(targets, 1):
                if str(target) in SystemMounter().mounts():
                    await stub.NodeUnpublishVolume(unpublish_request(model, target, n))
    finally:
        await server.stop(grace=None)
    if not samples:
        raise SystemExit("bench: the load fetch ended before any publish: raise --load-mib")
    return Latency(f"NodePublishVolume, {model.label}, under load", samples), took, row.size


def make_load(src: Path, files: int, nbytes: int) -> dict[str, Path]:
    write_real(src, nbytes, files)
    return {p.name: p for p in sorted(src.iterdir())}


def mounts_under(root: Path) -> list[str]:
    prefix = f"{root}/"
    return [t for t in SystemMounter().mounts() if t.startswith(prefix)]


@contextlib.contextmanager
def unmounting(root: Path) -> Iterator[None]:
    """On the way out, whatever happened: unmount every target left under ``root``."""
    try:
        yield
    finally:
        mounter = SystemMounter()
        for target in sorted(mounts_under(root), key=len, reverse=True):
            try:
                mounter.unmount(Path(target))
            except Exception as exc:
                say(f"bench: could not unmount {target}: {exc}")


# -- output ----------------------------------------------------------------------------------


def render(title: str, latencies: list[Latency], copies: list[Timed]) -> str:
    lines = [
        title,
        "",
        f"| {'operation':52} | {'calls':>5} | {'p50 ms':>8} | {'p99 ms':>8} | {'max ms':>8} "
        f"| {'seconds':>8} |",
        f"|{'-' * 54}|{'-' * 7}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|",
    ]
    for lat in latencies:
        lines.append(
            f"| {lat.name:52} | {len(lat.samples_ms):5d} | {lat.pct(50):8.2f} | "
            f"{lat.pct(99):8.2f} | {max(lat.samples_ms):8.2f} | {'':>8} |"
        )
    for c in copies:
        lines.append(f"| {c.name:52} | {'':>5} | {'':>8} | {'':>8} | {'':>8} | {c.seconds:8.3f} |")
    notes = [f"  {c.name}: {c.note}" for c in copies if c.note]
    return "\n".join([*lines, "", *notes] if notes else lines)


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small-gib", type=float, default=1.0)
    ap.add_argument("--small-files", type=int, default=8)
    ap.add_argument("--large-gib", type=float, default=64.0)
    ap.add_argument("--large-files", type=int, default=256)
    ap.add_argument(
        "--calls", type=int, default=200, help="publishes per model (the requirement: >= 200)"
    )
    ap.add_argument(
        "--load-files", type=int, default=4, help="files of the model fetched meanwhile"
    )
    ap.add_argument("--load-mib", type=int, default=512, help="MiB per file of that model")
    output_arguments(ap, keep=True)
    args = ap.parse_args()
    if args.calls < 1 or args.small_files < 1 or args.large_files < 1:
        ap.error("--calls and --*-files must be at least 1")
    if args.small_gib <= 0 or args.large_gib <= 0:
        ap.error("--small-gib and --large-gib must be positive")
    return args


def verdict(what: str, p99_ms: float, target_ms: float) -> str:
    mark = "PASS" if p99_ms <= target_ms else "MISS"
    return f"{mark} {what}: {p99_ms:.2f} ms (target <= {target_ms:g} ms)"


def size_label(nbytes: int, files: int) -> str:
    size = f"{nbytes / GIB:g} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"
    return f"{size} in {files} files"


def main() -> int:
    args = arguments()
    if os.geteuid() != 0:
        raise SystemExit("bench/publish_latency.py makes real bind mounts: run it as root")
    if args.calls < 200:
        say(f"bench: {args.calls} calls per model, fewer than the 200 the requirement asks for")
    small_bytes = int(args.small_gib * GIB)
    large_bytes = int(args.large_gib * GIB)
    work = Path(tempfile.mkdtemp(prefix="wc-bench-publish-", dir=args.workdir or "/var/tmp"))
    config = Config(
        store=StoreConfig(root=work / "store"),
        policy=PolicyConfig(file_roots=(work / "src",)),
        csi=CsiConfig(kubelet_dir=work / "pods"),
    )
    store = Store(config.store)
    fetcher = build_fetcher(config, store)
    try:
        with unmounting(work):
            say(f"bench: building the models in {work / 'store'}")
            part = config.fetch.part_bytes
            started = time.perf_counter()
            small = build_model(
                store, work / "src" / "small", "small", small_bytes, args.small_files, part
            )
            small_s = time.perf_counter() - started
            large = build_model(
                store, work / "src" / "large", "large", large_bytes, args.large_files, part
            )
            setup_s = time.perf_counter() - started
            apparent, allocated = disk_usage(work / "store")
            say(
                f"bench: models built in {setup_s:.1f} s (small {small_s:.1f} s, large "
                f"{setup_s - small_s:.1f} s); the store holds {apparent / GIB:.2f} GiB in "
                f"{allocated / 2**20:.1f} MiB of disk"
            )
            node = NodeService(
                "bench-node",
                store,
                fetcher,
                SystemMounter(),
                build_policy(config, fetcher.sources, fetcher.signatures),
                Repairer(store, fetcher),
                checks=store_checks(store),
                kubelet_dir=config.csi.kubelet_dir,
                publish_wait_s=2.0,
            )
            latencies = asyncio.run(
                serve_and_measure(
                    node, f"unix://{work}/csi.sock", [small, large], work / "pods", args.calls
                )
            )
            assert not store.pins(), f"pins left after unpublishing: {store.pins()[:3]}"

            load_bytes = args.load_files * args.load_mib * 2**20
            say(f"bench: the load, {args.load_files} x {args.load_mib} MiB, in a registry")
            with run_registry(work / "registry") as registry:
                publisher = ModelPublisher(RegistryPusher(registry.url), work / "publish")
                publisher.workdir.mkdir()
                for name in ("alone", "load"):
                    files = make_load(work / f"{name}-src", args.load_files, load_bytes)
                    publisher.oras(f"bench/{name}", "v1", files)
                    shutil.rmtree(work / f"{name}-src")
                drop_caches()
                t0 = time.perf_counter()
                fetcher.warm(parse_reference(f"oci://{registry.host}/bench/alone:v1"))
                alone_s = time.perf_counter() - t0
                drop_caches()
                loaded, load_s, _ = asyncio.run(
                    measure_under_load(
                        node,
                        fetcher,
                        f"unix://{work}/csi-load.sock",
                        small,
                        work / "pods" / "under-load",
                        args.calls,
                        f"oci://{registry.host}/bench/load:v1",
                    )
                )
            latencies.append(loaded)
            assert not store.pins(), f"pins left after unpublishing: {store.pins()[:3]}"

            say("bench: writing the real bytes to copy")
            real = work / "copy-src"
            write_real(real, small_bytes, args.small_files)
            copied = measure(
                "cp -r + sync",
                [["cp", "-r", str(real), str(work / "copy-dst")]],
                small_bytes,
                then=["sync"],
            )
            shutil.rmtree(work / "copy-dst")
            shutil.rmtree(real)
            rate = small_bytes / copied.seconds
            floor_note = "model bytes / 1.25 GB/s: what an init-container download costs at least"
            copies = [
                Timed(
                    f"cp -r + sync, {small.label}",
                    copied.seconds,
                    small_bytes,
                    f"real bytes, page cache dropped first: {rate / MB:.0f} MB/s, "
                    f"peak RSS {copied.peak_rss / MB:.0f} MB",
                ),
                Timed(
                    f"cp -r + sync, {large.label} (extrapolated)",
                    large_bytes / rate,
                    large_bytes,
                    "extrapolated at the measured copy rate; not copied: would need "
                    f"{large_bytes / GIB:g} GiB of disk",
                ),
                Timed(
                    f"network floor 10 Gbit/s, {small.label}",
                    small_bytes / NETWORK_FLOOR_BPS,
                    small_bytes,
                    floor_note,
                ),
                Timed(
                    f"network floor 10 Gbit/s, {large.label}",
                    large_bytes / NETWORK_FLOOR_BPS,
                    large_bytes,
                    floor_note,
                ),
            ]
        idle = max(
            lat.pct(99)
            for lat in latencies
            if lat.name.startswith("NodePublish") and not lat.name.endswith("under load")
        )
        title = (
            f"Publish latency through the CSI socket (real read-only bind mounts, verify fast), "
            f"{args.calls} new targets per model.\nModels built in {setup_s:.1f} s; the store "
            f"holds {apparent / GIB:.2f} GiB in {allocated / 2**20:.1f} MiB of disk. "
            f"Under load: {len(loaded.samples_ms)} publishes while the node fetched "
            f"{load_bytes / GIB:g} GiB at {load_bytes / load_s / MB:.0f} MB/s (alone: "
            f"{load_bytes / alone_s / MB:.0f} MB/s)."
        )
        verdicts = [
            verdict("publish p99, idle", idle, TARGET_P99_MS),
            verdict("publish p99, under load", loaded.pct(99), TARGET_P99_MS),
        ]
        say(render(title, latencies, copies) + "\n\n" + "\n".join(verdicts))
        if args.json:
            print(json.dumps([lat.row() for lat in latencies] + [c.__dict__ for c in copies]))
        return 0
    finally:
        fetcher.close()
        store.close()
        left = mounts_under(work)
        if left:
            say(f"bench: {len(left)} mounts remain under {work}; leaving it in place")
        elif args.keep:
            say(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
