"""Shared benchmark plumbing: timed, RSS- and CPU-measured subprocess runs and a side-by-side
table.

CPU seconds are user + system time of the contender's own processes (the children reaped
during its run, from ``getrusage(RUSAGE_CHILDREN)`` deltas) or, for an in-process contender, of
this process (:func:`cpu_self`). Kernel work done on nobody's behalf (writeback by kworkers,
softirq network processing) is in no one's figure, for every contender alike.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".venv-peers"
MB = 1_000_000
GIB = 1024**3


@dataclass(frozen=True)
class Result:
    name: str
    seconds: float
    nbytes: int
    peak_rss: int
    """Bytes: the largest resident set among the processes of the run."""
    note: str = ""
    cpu_seconds: float = 0.0
    """User + system seconds the contender's processes (or threads) spent; 0: not measured."""

    @property
    def mb_s(self) -> float:
        return self.nbytes / MB / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_seconds / (self.nbytes / GIB) if self.nbytes else 0.0


def cpu_children() -> float:
    """User + system seconds of every child reaped so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_self() -> float:
    """User + system seconds of this process, all its threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache so each contender reads from disk."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_parallel(
    cmds: Sequence[Sequence[str]],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    *,
    cpu: list[float] | None = None,
) -> tuple[float, int]:
    """Run commands at once; return (wall seconds, peak RSS bytes of any of them), and append
    the CPU seconds (user + system) of all of them to ``cpu`` when given.

    Each command runs under GNU time, whose own small image is what the child starts from, so
    the reported maximum RSS is the command's and not this Python process's before exec (GNU
    time's own CPU, a millisecond, is in the CPU figure)."""
    gnu_time = shutil.which("time", path="/usr/bin") or "/usr/bin/time"
    if not Path(gnu_time).exists():
        raise SystemExit("GNU time is missing: apt-get install -y time")
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"rss{i}" for i in range(len(cmds))]
        cpu_before = cpu_children()
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                [gnu_time, "-q", "-f", "%M", "-o", str(o), *c],
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for c, o in zip(cmds, outs, strict=True)
        ]
        errors = []
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                errors.append(
                    f"{' '.join(map(str, p.args[5:8]))}... exited {p.returncode}: "
                    f"{err.decode(errors='replace')[-2000:]}"
                )
        elapsed = time.perf_counter() - started
        if cpu is not None:
            cpu.append(cpu_children() - cpu_before)
        if errors:
            raise RuntimeError("\n".join(errors))
        peak = max(int(o.read_text().split()[-1]) * 1024 for o in outs)
    return elapsed, peak


def measure(
    name: str,
    cmds: Sequence[Sequence[str]],
    nbytes: int,
    *,
    note: str = "",
    env: dict[str, str] | None = None,
    then: Sequence[str] | None = None,
) -> Result:
    """Drop caches, run ``cmds`` in parallel (then ``then``, inside the timing and the CPU
    figure)."""
    drop_caches()
    cpu_before = cpu_children()
    started = time.perf_counter()
    _, peak = run_parallel(cmds, env=env)
    if then:
        subprocess.run(list(then), check=True)
    seconds = time.perf_counter() - started
    return Result(name, seconds, nbytes, peak, note, cpu_children() - cpu_before)


def peer_python() -> str:
    """The interpreter of the peers' virtual environment (oras, kserve-storage, s5cmd)."""
    py = PEERS_VENV / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"peer packages missing: run `scripts/dev setup` (expects {py})")
    return str(py)


def peer_bin(name: str) -> str:
    exe = PEERS_VENV / "bin" / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: run `scripts/dev setup`")
    return found


def table(
    title: str,
    ours: Result,
    others: Sequence[Result],
    *,
    baseline: Result | None = None,
    ratio_header: str = "weightcache / it",
) -> str:
    """Rows side by side. The ratio column is ours' rate over each row's, or with ``baseline``
    each row's rate over the baseline's. A peak RSS or CPU time of 0 (not measured) shows as
    ``-``."""
    lines = [title, ""]
    lines.append(
        f"| {'contender':44} | {'seconds':>8} | {'MB/s':>8} | {ratio_header:>16} "
        f"| {'peak RSS MB':>11} | {'CPU s/GiB':>9} |"
    )
    lines.append(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 18}|{'-' * 13}|{'-' * 11}|")
    for r in [ours, *others]:
        if baseline is None:
            ratio = ours.mb_s / r.mb_s if r.mb_s else 0.0
        else:
            ratio = r.mb_s / baseline.mb_s if baseline.mb_s else 0.0
        label = r.name + (f" ({r.note})" if r.note else "")
        rss = f"{r.peak_rss / MB:11.0f}" if r.peak_rss else f"{'-':>11}"
        cpu = f"{r.cpu_s_per_gib:9.2f}" if r.cpu_seconds else f"{'-':>9}"
        lines.append(
            f"| {label:44} | {r.seconds:8.2f} | {r.mb_s:8.0f} | {ratio:15.2f}x | {rss} | {cpu} |"
        )
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(
    title: str,
    ours: Result,
    others: Sequence[Result],
    as_json: bool,
    *,
    baseline: Result | None = None,
    ratio_header: str = "weightcache / it",
    extra: Mapping[str, Mapping[str, object]] | None = None,
) -> None:
    """Print the table on stderr and, if asked, every result as JSON on stdout (with the
    ``extra`` fields of a row, keyed by its name, merged in)."""
    print(table(title, ours, others, baseline=baseline, ratio_header=ratio_header), file=sys.stderr)
    if as_json:
        import json

        extra = extra or {}
        print(
            json.dumps(
                [
                    r.__dict__
                    | {"mb_s": r.mb_s, "cpu_s_per_gib": r.cpu_s_per_gib}
                    | dict(extra.get(r.name, {}))
                    for r in [ours, *others]
                ]
            )
        )


def fetch_arguments(doc: str | None) -> argparse.Namespace:
    """The command line shared by the fetch benchmarks."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mib", type=int, default=1024)
    output_arguments(ap)
    return ap.parse_args()


def output_arguments(ap: argparse.ArgumentParser, keep: bool = False) -> None:
    """``--workdir`` (and ``--keep``) and ``--json``, as every benchmark takes them."""
    ap.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="on the disk to measure (default: a temp dir under /var/tmp)",
    )
    if keep:
        ap.add_argument("--keep", action="store_true", help="leave the temp dir in place")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")


def emptied(path: Path) -> Path:
    """``path`` as a new empty directory (what each contender writes into)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path
