"""Fetch a model of N shards from a loopback S3 endpoint: weightcache beside its baselines.

    .venv/bin/python bench/fetch_s3.py                   # 4 x 1 GiB, the full run
    .venv/bin/python bench/fetch_s3.py --shard-mib 8     # a smoke run

The endpoint is s3rver (npm), which serves ranged GETs from files; moto reads a whole object for
every ranged GET, so a moto figure would measure moto. Contenders, each after dropping the page
cache: weightcache warm (verified, durable), curl -o of presigned URLs (with and without sync),
s5cmd cp, boto3's download_file, and dd oflag=direct of zeros (the disk's write rate, no network).

CPU seconds per GiB are each contender's own processes; the server's (s3rver, node) are counted
apart, from /proc, to tell which bound weightcache's run hit: CPU when weightcache and the
server together kept >= 85% of the cores busy, else the disk when weightcache wrote at >= 85% of
dd's rate, else the network or the server. Targets: weightcache >= 0.9x curl -o (not durable)
unless the disk is the bound, and never below curl -o + sync; PASS/MISS on stderr.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    MB,
    ROOT,
    Result,
    emptied,
    fetch_arguments,
    measure,
    peer_bin,
    peer_python,
    report,
    say,
)
from fetch_oci import make_shards

from weightcache.testing.services import ServiceUnavailable, free_port

S3RVER = ROOT / ".bench-node" / "node_modules" / ".bin" / "s3rver"
CREDS = {
    "AWS_ACCESS_KEY_ID": "S3RVER",
    "AWS_SECRET_ACCESS_KEY": "S3RVER",
    "AWS_DEFAULT_REGION": "us-east-1",
}
TARGET_VS_CURL = 0.9
BUSY = 0.85
"""Share of the cores (or of the disk's write rate) above which a run counts as bound by it."""
BOTO3_DOWNLOAD = """
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
for key in sys.argv[4:]:
    s3.download_file(sys.argv[2], key, sys.argv[3] + "/" + key.replace("/", "_"))
"""


@contextlib.contextmanager
def run_s3rver(data: Path) -> Iterator[tuple[str, int]]:
    """s3rver on a free loopback port: (its URL, its pid)."""
    if not S3RVER.exists():
        raise ServiceUnavailable(f"s3rver missing: run `scripts/dev setup` (expects {S3RVER})")
    port = free_port()
    data.mkdir(parents=True)
    proc = subprocess.Popen(
        [
            str(S3RVER),
            "-d",
            str(data),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "--silent",
            "--no-vhost-buckets",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib3

        http = urllib3.PoolManager(retries=False)
        for _ in range(300):
            with contextlib.suppress(urllib3.exceptions.HTTPError):
                http.request("GET", url)
                break
            if proc.poll() is not None:
                raise ServiceUnavailable(f"s3rver exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def process_cpu(pid: int) -> float:
    """User + system seconds of a running process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_server_cpu(pid: int, run: Callable[[], Result]) -> tuple[Result, float]:
    """``run()`` and the server's CPU seconds during it."""
    before = process_cpu(pid)
    result = run()
    return result, process_cpu(pid) - before


def bound(ours: Result, server_cpu: float, disk: Result) -> str:
    """Which limit weightcache's run hit: CPU, disk, or network/server."""
    cores = os.cpu_count() or 1
    busy = (ours.cpu_seconds + server_cpu) / ours.seconds / cores if ours.seconds else 0.0
    if busy >= BUSY:
        return f"CPU ({busy:.0%} of {cores} cores busy: weightcache and the server)"
    if disk.mb_s and ours.mb_s >= BUSY * disk.mb_s:
        return f"disk ({ours.mb_s / disk.mb_s:.0%} of dd's write rate)"
    return f"network/server (cores {busy:.0%} busy, {ours.mb_s / disk.mb_s:.0%} of the disk)"


def verdicts(ours: Result, server_cpu: float, results: list[Result], disk: Result) -> list[str]:
    by_name = {r.name: r for r in results}
    curl = by_name["curl -o presigned (4 parallel)"]
    durable = by_name["curl -o presigned + sync (4 parallel)"]
    hit = bound(ours, server_cpu, disk)
    lines = [
        f"weightcache's run: {ours.cpu_s_per_gib:.2f} CPU s/GiB, the server "
        f"{server_cpu / (ours.nbytes / 1024**3):.2f} CPU s/GiB; bound: {hit}"
    ]
    vs_curl = ours.mb_s / curl.mb_s
    if hit.startswith("disk"):
        lines.append(f"weightcache / curl -o: {vs_curl:.2f}x (the disk is the bound: not judged)")
    else:
        ok = vs_curl >= TARGET_VS_CURL
        lines.append(
            f"weightcache / curl -o: {vs_curl:.2f}x (target >= {TARGET_VS_CURL}x): "
            f"{'PASS' if ok else 'MISS'}"
        )
    vs_durable = ours.mb_s / durable.mb_s
    lines.append(
        f"weightcache / curl -o + sync: {vs_durable:.2f}x (target >= 1.0x): "
        f"{'PASS' if vs_durable >= 1.0 else 'MISS'}"
    )
    return lines


def main() -> int:
    args = fetch_arguments(__doc__)
    shard_bytes = args.shard_mib * 1024 * 1024
    total = shard_bytes * args.shards
    work = Path(tempfile.mkdtemp(prefix="wc-bench-s3-", dir=args.workdir or "/var/tmp"))
    try:
        say(f"bench: {args.shards} x {args.shard_mib} MiB in {work}")
        files = make_shards(work / "src", args.shards, shard_bytes)
        with run_s3rver(work / "s3rver") as (url, server_pid):
            import boto3

            env = {**os.environ, **CREDS, "AWS_ENDPOINT_URL": url}
            s3 = boto3.client(
                "s3",
                endpoint_url=url,
                region_name="us-east-1",
                aws_access_key_id="S3RVER",
                aws_secret_access_key="S3RVER",
            )
            s3.create_bucket(Bucket="bench")
            keys = []
            for name, path in files.items():
                s3.upload_file(str(path), "bench", f"model/{name}")
                keys.append(f"model/{name}")
            shutil.rmtree(work / "src")
            urls = [
                s3.generate_presigned_url(
                    "get_object", Params={"Bucket": "bench", "Key": k}, ExpiresIn=3600
                )
                for k in keys
            ]
            out = work / "out"

            emptied(out)
            ours, server_cpu = with_server_cpu(
                server_pid,
                lambda: measure(
                    "weightcache warm (sha256+xxh3, fsync)",
                    [
                        [
                            str(ROOT / ".venv/bin/weightcache"),
                            "warm",
                            "s3://bench/model/",
                            "--store",
                            str(out / "store"),
                        ]
                    ],
                    total,
                    env=env,
                ),
            )
            server: dict[str, float] = {ours.name: server_cpu}

            def served(run: Callable[[], Result]) -> Result:
                result, cpu = with_server_cpu(server_pid, run)
                server[result.name] = cpu
                return result

            curls = [
                ["curl", "-sS", "--fail", "-o", str(out / f"{i}"), u] for i, u in enumerate(urls)
            ]
            results: list[Result] = []
            emptied(out)
            results.append(
                served(
                    lambda: measure(
                        "curl -o presigned + sync (4 parallel)", curls, total, then=["sync"]
                    )
                )
            )
            emptied(out)
            results.append(served(lambda: measure("curl -o presigned (4 parallel)", curls, total)))
            emptied(out)
            results.append(
                served(
                    lambda: measure(
                        "s5cmd cp",
                        [
                            [
                                peer_bin("s5cmd"),
                                "--endpoint-url",
                                url,
                                "cp",
                                "s3://bench/model/*",
                                f"{out}/",
                            ]
                        ],
                        total,
                        env=env,
                    )
                )
            )
            emptied(out)
            results.append(
                served(
                    lambda: measure(
                        "boto3 download_file",
                        [[peer_python(), "-c", BOTO3_DOWNLOAD, url, "bench", str(out), *keys]],
                        total,
                        env=env,
                    )
                )
            )
            emptied(out)
            count = shard_bytes // (16 * 1024 * 1024) or 1
            block = shard_bytes // count
            disk = measure(
                "dd oflag=direct of zeros (4 parallel, disk write)",
                [
                    [
                        "dd",
                        "if=/dev/zero",
                        f"of={out / str(i)}",
                        f"bs={block}",
                        f"count={count}",
                        "oflag=direct",
                        "conv=fsync",
                        "status=none",
                    ]
                    for i in range(args.shards)
                ],
                total,
            )
            results.append(disk)
            shutil.rmtree(out, ignore_errors=True)
        title = (
            f"S3 fetch: {args.shards} x {args.shard_mib} MiB from s3rver on loopback "
            f"({total / MB:.0f} MB), page cache dropped before each"
        )
        report(
            title,
            ours,
            results,
            args.json,
            extra={name: {"server_cpu": cpu} for name, cpu in server.items()},
        )
        for name, cpu in server.items():
            say(f"server (s3rver) CPU during {name}: {cpu / (total / 1024**3):.2f} s/GiB")
        for line in verdicts(ours, server_cpu, results, disk):
            say(line)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
