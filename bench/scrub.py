"""Scrub throughput beside reading the same files with cat and dd, and the scrub cap held.

    .venv/bin/python bench/scrub.py                                   # 4 GiB in 8 files
    .venv/bin/python bench/scrub.py --gib 0.03 --files 3 --cap-mib 20  # a smoke run

A real model of non-sparse, incompressible-looking bytes (a random 16 MiB block, varied per
block) is written to a source dir and fetched into a real Store with the project's own
``build_fetcher(config, store).warm(file://...)``, so the blobs are exactly what production holds
(written with O_DIRECT, fingerprinted by the fetcher). The source is deleted afterwards. Then,
each after the page cache is dropped, over the same blob files (``Store.blob_path`` of every sha
in ``Store.scrub_order()``):

  cat > /dev/null          buffered reads with the kernel's readahead: the target's baseline
  dd bs=16M iflag=direct   the raw O_DIRECT read, one 16 MiB request at a time, as the scrubber
  weightcache scrub        one ``Scrubber.scrub_pass()`` in-process, no cap (bytes_per_s=0)
  weightcache scrub, cap   the same with ``--cap-mib``; achieved rate / cap (target within 10%)

Targets: uncapped scrub >= 0.8x cat, and the capped rate within 10% of the cap. The verdicts are
printed on stderr beside the table; ``--json`` prints the rows on stdout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MB, Result, drop_caches, measure, output_arguments, report, say
from publish_latency import write_real

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.config import Config, ScrubConfig, StoreConfig
from weightcache.daemon.references import parse_reference
from weightcache.daemon.scrubber import Scrubber
from weightcache.daemon.store.store import Store
from weightcache.daemon.store.verify import Problem

GIB = 1024**3
MIB = 1024**2
TARGET_VS_CAT = 0.8
CAP_TOLERANCE = 0.10


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.0, help="model size (default 4)")
    ap.add_argument("--files", type=int, default=8, help="files in the model (default 8)")
    ap.add_argument(
        "--cap-mib",
        type=float,
        default=200.0,
        help="scrub cap in MiB/s for the capped pass (default 200, below the disk's rate; "
        "halved to half the uncapped rate if the disk is slower)",
    )
    output_arguments(ap, keep=True)
    args = ap.parse_args()
    if args.gib <= 0 or args.files < 1 or args.cap_mib <= 0:
        ap.error("--gib and --cap-mib must be positive, --files at least 1")
    return args


def warm_model(store: Store, config: Config, src: Path) -> str:
    """Fetch ``src`` into the store as production does; the model's digest."""
    fetcher = build_fetcher(config, store)
    try:
        row = fetcher.warm(parse_reference(f"file://{src}"))
    finally:
        fetcher.close()
    return row.digest


def scrub(store: Store, bytes_per_s: int, name: str, note: str = "") -> Result:
    """One timed scrub pass from a dropped page cache; it must find nothing and repair nothing."""
    repairs: list[Problem] = []
    drop_caches()
    scrubber = Scrubber(
        store, repairs.extend, ScrubConfig(bytes_per_s=bytes_per_s), stop=threading.Event()
    )
    started = time.perf_counter()
    result = scrubber.scrub_pass()
    seconds = time.perf_counter() - started
    assert result.complete, "the scrub pass stopped part-way"
    assert result.problems == [], f"the scrub found problems: {result.problems[:3]}"
    assert repairs == [], f"the scrub started repairs: {repairs[:3]}"
    say(
        f"bench: {name}: {result.files} files, {result.bytes / MB:.0f} MB in {seconds:.2f} s "
        f"({result.bytes / MB / seconds:.0f} MB/s), no problems, no repairs"
    )
    return Result(name, seconds, result.bytes, 0, note)


def main() -> int:
    args = arguments()
    nbytes = int(args.gib * GIB)
    work = Path(tempfile.mkdtemp(prefix="wc-bench-scrub-", dir=args.workdir or "/var/tmp"))
    config = Config(store=StoreConfig(root=work / "store"))
    store = Store(config.store)
    try:
        if not drop_caches():
            say("bench: cannot drop the page cache (not root?): cat and dd may read from memory")
        src = work / "src"
        say(f"bench: writing {nbytes / GIB:g} GiB in {args.files} files to {src}")
        write_real(src, nbytes, args.files)
        started = time.perf_counter()
        warm_model(store, config, src)
        say(f"bench: warmed into {work / 'store'} in {time.perf_counter() - started:.1f} s")
        shutil.rmtree(src)
        paths = [str(store.blob_path(sha)) for sha, _ in store.scrub_order()]
        held = sum(Path(p).stat().st_size for p in paths)
        assert len(paths) == args.files and held == nbytes, (len(paths), held)

        cat = measure("cat > /dev/null", [["sh", "-c", 'cat "$@" > /dev/null', "sh", *paths]], held)
        dd = measure(
            "dd bs=16M iflag=direct",
            [
                [
                    "sh",
                    "-c",
                    'for f; do dd if="$f" of=/dev/null bs=16M iflag=direct status=none; done',
                    "sh",
                    *paths,
                ]
            ],
            held,
        )
        uncapped = scrub(store, 0, "weightcache scrub, no cap", "in-process")

        cap = int(args.cap_mib * MIB)
        cap_note = f"cap {cap / MIB:g} MiB/s"
        if uncapped.nbytes / uncapped.seconds < cap:
            cap = int(uncapped.nbytes / uncapped.seconds / 2)
            cap_note = f"cap {cap / MIB:.0f} MiB/s, half the uncapped rate"
            say(
                f"bench: the uncapped scrub ({uncapped.mb_s:.0f} MB/s) is below --cap-mib "
                f"{args.cap_mib:g}: capping at half the uncapped rate, {cap / MIB:.0f} MiB/s"
            )
        capped = scrub(store, cap, "weightcache scrub, capped", cap_note)

        vs_cat = uncapped.mb_s / cat.mb_s
        of_cap = capped.nbytes / capped.seconds / cap
        within = abs(of_cap - 1) <= CAP_TOLERANCE
        title = (
            f"Scrub of a warmed {held / GIB:g} GiB model in {len(paths)} files beside reading "
            "the same blob files; page cache dropped before each."
        )
        report(
            title,
            cat,
            [dd, uncapped, capped],
            args.json,
            baseline=cat,
            ratio_header="it / cat",
            extra={
                capped.name: {"cap_bytes_per_s": cap, "within_10pct": within},
                uncapped.name: {"vs_cat": vs_cat},
            },
        )
        say(
            f"uncapped scrub / cat: {vs_cat:.2f}x (target >= {TARGET_VS_CAT}x): "
            f"{'PASS' if vs_cat >= TARGET_VS_CAT else 'MISS'}"
        )
        say(
            f"capped scrub: {capped.nbytes / capped.seconds / MIB:.1f} MiB/s for a cap of "
            f"{cap / MIB:.1f} MiB/s = {of_cap:.3f}x (target within {CAP_TOLERANCE:.0%}): "
            f"{'PASS' if within else 'MISS'}"
        )
        return 0
    finally:
        store.close()
        if args.keep:
            say(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
