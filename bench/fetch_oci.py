"""Fetch a model of N shards from the loopback registry: weightcache beside its baselines.

    .venv/bin/python bench/fetch_oci.py                   # 4 x 1 GiB, the full run
    .venv/bin/python bench/fetch_oci.py --shard-mib 8     # a smoke run

Contenders, each after dropping the page cache, each writing to the same disk:
  weightcache warm      fetch + sha256 + xxh3 + fsync + install (verified and durable)
  curl -o + sync        the practical baseline: unverified but durable
  curl -o               unverified, not durable
  dd conv=fsync         the disk's durable-write limit for the same bytes
  oras (Python) pull    the `oras` package
  kserve-storage        the `kserve-storage` package pulling the same model as a modelcar image
                        (uncompressed tar layer; it streams into tar without a digest check),
                        beside weightcache warm of that image
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    MB,
    ROOT,
    Result,
    emptied,
    fetch_arguments,
    measure,
    peer_python,
    report,
    say,
)

from weightcache.testing.models import ModelPublisher
from weightcache.testing.oci_push import RegistryPusher
from weightcache.testing.services import run_registry

ORAS_PULL = """
import sys, oras.client
c = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)
c.pull(target=sys.argv[2], outdir=sys.argv[3])
"""
KSERVE_DOWNLOAD = """
import sys
from kserve_storage import Storage
Storage.download(sys.argv[2], out_dir=sys.argv[1])
"""


def make_shards(src: Path, shards: int, shard_bytes: int) -> dict[str, Path]:
    src.mkdir(parents=True, exist_ok=True)
    files = {}
    block = 64 * 1024 * 1024
    for i in range(shards):
        path = src / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        with path.open("wb") as f:
            left = shard_bytes
            while left:
                n = min(block, left)
                f.write(os.urandom(n))
                left -= n
        files[path.name] = path
    return files


def main() -> int:
    args = fetch_arguments(__doc__)
    shard_bytes = args.shard_mib * 1024 * 1024
    total = shard_bytes * args.shards
    work = Path(tempfile.mkdtemp(prefix="wc-bench-oci-", dir=args.workdir or "/var/tmp"))
    try:
        say(f"bench: {args.shards} x {args.shard_mib} MiB in {work}")
        files = make_shards(work / "src", args.shards, shard_bytes)
        with run_registry(work / "registry") as registry:
            publisher = ModelPublisher(RegistryPusher(registry.url), work / "publish")
            publisher.workdir.mkdir()
            desc = publisher.oras("bench/model", "v1", files)
            publisher.image("bench/image", "v1", files, compression="none")
            manifest = json.loads(
                RegistryPusher(registry.url).get_manifest("bench/model", desc.digest)[0]
            )
            blob_urls = [
                f"{registry.url}/v2/bench/model/blobs/{layer['digest']}"
                for layer in manifest["layers"]
            ]
            out = work / "out"
            results: list[Result] = []

            emptied(out)
            ours = measure(
                "weightcache warm (sha256+xxh3, fsync)",
                [
                    [
                        str(ROOT / ".venv/bin/weightcache"),
                        "warm",
                        f"oci://{registry.host}/bench/model:v1",
                        "--store",
                        str(out / "store"),
                    ]
                ],
                total,
            )
            curls = [
                ["curl", "-sS", "--fail", "-o", str(out / f"{i}"), u]
                for i, u in enumerate(blob_urls)
            ]
            emptied(out)
            results.append(measure("curl -o + sync (4 parallel)", curls, total, then=["sync"]))
            emptied(out)
            results.append(measure("curl -o (4 parallel)", curls, total))
            emptied(out)
            results.append(
                measure(
                    "dd conv=fsync (4 parallel, durable limit)",
                    [
                        [
                            "dd",
                            f"if={p}",
                            f"of={out / p.name}",
                            "bs=16M",
                            "conv=fsync",
                            "status=none",
                        ]
                        for p in files.values()
                    ],
                    total,
                )
            )
            emptied(out)
            results.append(
                measure(
                    "oras (Python) pull",
                    [
                        [
                            peer_python(),
                            "-c",
                            ORAS_PULL,
                            registry.host,
                            f"{registry.host}/bench/model:v1",
                            str(out),
                        ]
                    ],
                    total,
                )
            )
            emptied(out)
            results.append(
                measure(
                    "kserve-storage Storage.download",
                    [
                        [
                            peer_python(),
                            "-c",
                            KSERVE_DOWNLOAD,
                            str(out),
                            f"oci://{registry.host}/bench/image:v1",
                        ]
                    ],
                    total,
                    note="modelcar image",
                    env={**os.environ, "KSERVE_OCI_INSECURE_REGISTRY": "true"},
                )
            )
            emptied(out)
            results.append(
                measure(
                    "weightcache warm",
                    [
                        [
                            str(ROOT / ".venv/bin/weightcache"),
                            "warm",
                            f"oci://{registry.host}/bench/image:v1",
                            "--store",
                            str(out / "store"),
                        ]
                    ],
                    total,
                    note="modelcar image",
                )
            )
            shutil.rmtree(out, ignore_errors=True)
        title = (
            f"OCI fetch: {args.shards} x {args.shard_mib} MiB from the loopback registry "
            f"({total / MB:.0f} MB), page cache dropped before each"
        )
        report(title, ours, results, args.json)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
