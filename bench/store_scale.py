"""A store with many files: how long `weightcache ls`, opening the store and a re-warm take.

    .venv/bin/python bench/store_scale.py               # 10,000 files
    .venv/bin/python bench/store_scale.py --files 200   # a smoke run

It warms a local directory of N small files plus a second model that shares half of them, then
times, as separate processes (what an operator or a restarted agent pays):
  weightcache ls --json      listing every model (target: under a second at 10,000 files)
  opening the store          reconciliation on start: stats only, no hashing
  weightcache warm again     a restart of a completed warm: bytes copied must be 0
beside `ls -R` and `find -type f | wc -l` over the same trees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, say

WC = str(ROOT / ".venv" / "bin" / "weightcache")
PY = str(ROOT / ".venv" / "bin" / "python")
OPEN_STORE = """
import sys, time
from pathlib import Path
from weightcache.daemon.config import StoreConfig
t = time.perf_counter()
from weightcache.daemon.store.store import Store
s = Store(StoreConfig(root=Path(sys.argv[1])))
n = sum(len(s.index.model_files(m.digest)) for m in s.models())
s.close()
print(time.perf_counter() - t, n)
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, out.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wc-bench-scale-", dir="/var/tmp"))
    try:
        src_a, src_b = work / "a", work / "b"
        for i in range(args.files):
            sub = src_a / f"d{i % 100:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"f{i:05d}.bin").write_bytes(os.urandom(64) + i.to_bytes(4, "big"))
        shutil.copytree(src_a, src_b)
        for i, f in enumerate(sorted(src_b.rglob("*.bin"))):
            if i % 2:
                f.write_bytes(b"changed" + i.to_bytes(4, "big"))
        store = work / "store"
        warm_s, _ = timed([WC, "warm", f"file://{src_a}", f"file://{src_b}", "--store", str(store)])
        ls_s, ls_out = timed([WC, "ls", "--store", str(store), "--json"])
        models = json.loads(ls_out)["models"]
        files_held = sum(m["files"] for m in models)
        open_s, open_out = timed([PY, "-c", OPEN_STORE, str(store)])
        rewarm_s, rewarm_out = timed(
            [WC, "warm", f"file://{src_a}", "--store", str(store), "--json"]
        )
        blobs = sum(1 for _ in (store / "blobs").rglob("*") if _.is_file())
        find_s, _ = timed(["sh", "-c", f"find {store / 'models'} -type f | wc -l"])
        lsr_s, _ = timed(["ls", "-R", str(store / "models")])
        rows = [
            ("weightcache ls --json (process)", ls_s, f"{len(models)} models, {files_held} files"),
            (
                "open the store (process: import + reconcile)",
                open_s,
                f"{open_out.split()[0][:6]} s inside the process",
            ),
            (
                "weightcache warm of a held model (process)",
                rewarm_s,
                "re-hashes the source directory; copies 0 bytes",
            ),
            ("find models -type f | wc -l", find_s, "peer: filesystem walk"),
            ("ls -R models", lsr_s, "peer: filesystem walk"),
        ]
        title = (
            f"Store scale: {args.files} + {args.files} files in 2 models sharing half "
            f"({blobs} blobs stored); first warm took {warm_s:.1f} s"
        )
        lines = [
            title,
            "",
            f"| {'operation':46} | {'seconds':>8} | note |",
            f"|{'-' * 48}|{'-' * 10}|------|",
        ]
        lines += [f"| {name:46} | {secs:8.3f} | {note} |" for name, secs, note in rows]
        print("\n".join(lines), file=sys.stderr)
        rewarm = json.loads(rewarm_out)["models"][0]
        assert rewarm["state"] == "ready"
        if args.json:
            print(
                json.dumps(
                    {
                        "ls_s": ls_s,
                        "open_s": open_s,
                        "rewarm_s": rewarm_s,
                        "files": files_held,
                        "blobs": blobs,
                    }
                )
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        say("")


if __name__ == "__main__":
    raise SystemExit(main())
