"""A model of many small files: the first warm beside `tar -x` + `sync` and `cp -r` + `sync`.

    .venv/bin/python bench/small_files.py                 # 20,000 files of 4 KiB
    .venv/bin/python bench/small_files.py --files 200     # a smoke run

Two shapes of the same files, each warmed into an empty store after dropping the page cache:
  modelcar image   one uncompressed tar layer from the loopback registry (members are staged,
                   the layer digest checked, then committed)
  file://          a local directory of raw files (each hashed, staged and committed)
Peers, durable like the warm: `tar -x` of the same layer file + `sync`, `cp -r` of the same
directory + `sync`. The cost a file is the figure that matters; the target is the warm within
``--target`` times its peer (the warm also hashes every byte and records every file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Result, measure, say

from weightcache.testing.models import ModelPublisher, members_for, write_tar
from weightcache.testing.oci_push import RegistryPusher
from weightcache.testing.services import run_registry

WC = str(ROOT / ".venv" / "bin" / "weightcache")


def make_files(count: int, size: int) -> dict[str, bytes]:
    return {
        f"d{i % 100:02d}/f{i:05d}.bin": os.urandom(size - 4) + i.to_bytes(4, "big")
        for i in range(count)
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--file-bytes", type=int, default=4096)
    ap.add_argument("--target", type=float, default=3.0, help="warm / peer seconds, at most")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wc-bench-small-", dir=args.workdir))
    nbytes = args.files * args.file_bytes
    try:
        files = make_files(args.files, args.file_bytes)
        src = work / "src"
        for rel, data in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        layer = work / "layer.tar"
        write_tar(layer, members_for(files, under="models"))
        out = work / "out"
        rows: list[tuple[Result, Result]] = []
        with run_registry(work / "registry") as registry:
            publisher = ModelPublisher(RegistryPusher(registry.url), work / "publish")
            publisher.workdir.mkdir()
            publisher.image("bench/small", "v1", files, compression="none")
            ref = f"oci://{registry.host}/bench/small:v1"
            for shape, source, peer_name, peer_cmd in (
                (
                    "modelcar image (1 tar layer)",
                    ref,
                    "tar -x + sync",
                    ["tar", "-x", "-f", str(layer), "-C", str(out / "peer")],
                ),
                (
                    "file:// directory",
                    f"file://{src}",
                    "cp -r + sync",
                    ["cp", "-r", str(src), str(out / "peer")],
                ),
            ):
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                ours = measure(
                    f"weightcache warm: {shape}",
                    [[WC, "warm", source, "--store", str(out / "store")]],
                    nbytes,
                )
                shutil.rmtree(out, ignore_errors=True)
                (out / "peer").mkdir(parents=True)
                peer = measure(peer_name, [peer_cmd], nbytes, then=["sync"])
                rows.append((ours, peer))
        shutil.rmtree(out, ignore_errors=True)
        lines = [
            f"Small files: {args.files} files of {args.file_bytes} bytes, first warm into an "
            "empty store, page cache dropped before each",
            "",
            f"| {'contender':42} | {'seconds':>8} | {'ms/file':>8} | {'files/s':>8} "
            f"| {'warm / peer':>11} | target <= {args.target:g}x |",
            f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 13}|{'-' * 16}|",
        ]
        doc = []
        for ours, peer in rows:
            ratio = ours.seconds / peer.seconds if peer.seconds else 0.0
            verdict = "PASS" if ratio <= args.target else "MISS"
            for r, cell, v in ((ours, f"{ratio:10.2f}x", verdict), (peer, f"{'':>11}", "")):
                lines.append(
                    f"| {r.name:42} | {r.seconds:8.2f} | {1000 * r.seconds / args.files:8.3f} "
                    f"| {args.files / r.seconds:8.0f} | {cell} | {v:14} |"
                )
            doc.append(
                {
                    "name": ours.name,
                    "seconds": ours.seconds,
                    "peer": peer.name,
                    "peer_seconds": peer.seconds,
                    "ms_per_file": 1000 * ours.seconds / args.files,
                    "ratio": ratio,
                    "verdict": verdict,
                }
            )
        say("\n".join(lines))
        if args.json:
            print(json.dumps(doc))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
