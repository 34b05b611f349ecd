"""The per-byte CPU cost of the fetch and scrub hashes, and how they scale over threads.

    .venv/bin/python bench/hashing.py                 # 1 GiB per hash and thread count
    .venv/bin/python bench/hashing.py --mib 64        # a smoke run

Each hash (sha256: every fetch; md5: an S3 object checked by its ETag; xxh3-128: the chunk and
whole-file fingerprints, and the scrub) digests ``--mib`` of random bytes in 16 MiB buffers, as
the fetcher feeds it. One thread gives CPU seconds per GiB (thread CPU time, so other load on
the machine does not inflate it); then 1..N threads hashing at once give the aggregate rate,
which shows whether hashlib and xxhash release the GIL and how far the machine's cores go.

From the per-core costs it projects, for the disk and network rates of a GPU node, how many
cores hash at line rate and how many hashing threads (files fetched at once, each one sha256
stream) reach the disk's rate; ``daemon/config.py``'s ``hashing_threads`` sets that default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GIB, say

from weightcache.daemon.config import SHA256_BYTES_PER_S_PER_CORE, hashing_threads

BLOCK = 16 * 1024 * 1024
HASHES: dict[str, Callable[[], Callable[[memoryview], object]]] = {
    "sha256": lambda: hashlib.sha256().update,
    "md5": lambda: hashlib.md5(usedforsecurity=False).update,
    "xxh3-128": lambda: xxhash.xxh3_128().update,
}
DISKS = (10e9, 25e9)
"""Local NVMe of a GPU node, bytes per second."""
LINKS = (100e9 / 8, 400e9 / 8)
"""Its network, bytes per second (100 and 400 Gbit/s)."""
CORES = (32, 128)
MODEL_TOLERANCE = 0.25
"""How far the measured sha256 rate may be from the one ``hashing_threads`` assumes."""


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="bytes hashed per run (default 1024)")
    ap.add_argument(
        "--threads", type=int, default=0, help="most threads at once (default: the cores)"
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args()
    if args.mib < 16 or args.threads < 0:
        ap.error("--mib must be at least 16 and --threads not negative")
    return args


def one_thread(name: str, data: memoryview, nbytes: int) -> float:
    """CPU seconds per GiB of ``name`` on one thread."""
    update = HASHES[name]()
    started = time.thread_time()
    for _ in range(nbytes // BLOCK):
        update(data)
    return (time.thread_time() - started) / (nbytes / GIB)


def threads_at_once(name: str, data: memoryview, nbytes: int, threads: int) -> float:
    """Aggregate bytes per second of ``threads`` threads, each hashing ``nbytes``."""

    def work() -> None:
        update = HASHES[name]()
        for _ in range(nbytes // BLOCK):
            update(data)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return threads * nbytes / (time.perf_counter() - started)


def main() -> int:
    args = arguments()
    cores = os.cpu_count() or 1
    most = args.threads or cores
    nbytes = args.mib * 1024 * 1024 // BLOCK * BLOCK
    data = memoryview(os.urandom(BLOCK))
    per_gib = {name: one_thread(name, data, nbytes) for name in HASHES}
    scaling = {
        name: {n: threads_at_once(name, data, nbytes, n) for n in range(1, most + 1)}
        for name in ("sha256", "xxh3-128")
    }
    say(f"Hash costs on this machine ({cores} cores), {nbytes / GIB:g} GiB per run:")
    say("")
    head = f"| {'hash':10} | {'CPU s/GiB':>9} | {'GB/s per core':>13} |"
    say(f"{head} aggregate GB/s, 1..{most} threads")
    say(f"|{'-' * 12}|{'-' * 11}|{'-' * 15}|{'-' * 34}")
    for name, cost in per_gib.items():
        rates = scaling.get(name)
        shown = ", ".join(f"{r / 1e9:.2f}" for r in rates.values()) if rates else "-"
        say(f"| {name:10} | {cost:9.3f} | {GIB / cost / 1e9:13.2f} | {shown}")
    sha_rate = GIB / per_gib["sha256"]
    fetch_cost = per_gib["sha256"] + 2 * per_gib["xxh3-128"]  # whole-file and per-chunk xxh3
    say("")
    say(
        f"fetch hashing (sha256 + 2 x xxh3): {fetch_cost:.3f} CPU s/GiB; with an ETag MD5 "
        f"(S3 without a SHA-256 checksum): {fetch_cost + per_gib['md5']:.3f}"
    )
    projection = []
    for rate in (*DISKS, *LINKS):
        label = f"{rate / 1e9:g} GB/s" + (
            f" ({rate * 8 / 1e9:g} Gbit/s)" if rate in LINKS else " NVMe"
        )
        hashing = rate / 1e9 * 1e9 / GIB * fetch_cost
        threads = math.ceil(rate / sha_rate)
        projection.append({"rate": rate, "cores_hashing": hashing, "sha256_threads": threads})
        say(
            f"at {label}: {hashing:.1f} cores hash (sha256 + xxh3); {threads} sha256 streams "
            "(files fetched at once) reach it"
        )
    for n in CORES:
        say(f"default files_in_parallel on {n} cores: {hashing_threads(n)}")
    off = abs(sha_rate / SHA256_BYTES_PER_S_PER_CORE - 1)
    say(
        f"sha256 per core measured {sha_rate / 1e9:.2f} GB/s; hashing_threads assumes "
        f"{SHA256_BYTES_PER_S_PER_CORE / 1e9:.2f} GB/s (target within {MODEL_TOLERANCE:.0%}): "
        f"{'PASS' if off <= MODEL_TOLERANCE else 'MISS'}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "cores": cores,
                    "cpu_s_per_gib": per_gib,
                    "scaling_bytes_per_s": scaling,
                    "fetch_cpu_s_per_gib": fetch_cost,
                    "projection": projection,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
