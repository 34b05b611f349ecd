"""Crash: SIGKILL of a `weightcache warm` at random moments of a multi-file fetch, then a
restart. Counted: corrupt files ever visible under models/ (0), PRAGMA integrity_check after
every kill (ok), and bytes fetched twice per file (at most the parts that were in flight)."""

from __future__ import annotations

import hashlib
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PART, Hold, read_tree, report, run_cli

from weightcache.testing.faultproxy import FaultProxy, Rule
from weightcache.testing.models import ModelPublisher

SECTION = "reliability"
FILES = 4
RANGES = 1


def _config(path: Path) -> Path:
    path.write_text(
        f"[fetch]\npart_bytes = {PART}\nretry_delays = [0.0]\n"
        f"files_in_parallel = {FILES}\nranges_per_file = {RANGES}\n"
    )
    return path


def _visible_and_correct(store: Path, files: dict[str, bytes]) -> tuple[int, int]:
    """(files visible under models/, of which not byte-identical to the source)."""
    visible = wrong = 0
    for tree in (store / "models").iterdir():
        for rel, data in read_tree(tree).items():
            visible += 1
            wrong += files.get(rel) != data
    return visible, wrong


def test_sigkill_at_random_moments_of_a_fetch(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    kills = request.config.getoption("--kills")
    rng = random.Random(13)
    worst_refetch = 0
    corrupt_visible = 0
    for n in range(kills):
        files = {
            f"shard-{i}.bin": rng.randbytes(rng.randint(2, 6) * PART + rng.randint(0, PART))
            for i in range(FILES)
        }
        repo = f"crash/m{n}"
        publisher.oras(repo, "v1", files)
        victim = rng.choice(sorted(files))
        sha = hashlib.sha256(files[victim]).hexdigest()
        moment = rng.randint(1, (len(files[victim]) - 1) // PART) * PART  # a part boundary
        hold = Hold()
        with proxy.state.lock:
            proxy.state.rules.clear()
            proxy.state.blob_bytes_by_path.clear()
        proxy.state.rules.append(Rule(rf"/blobs/sha256:{sha}", range_from=moment, before=hold))
        store = tmp_path / f"store{n}"
        config = _config(tmp_path / f"wc{n}.toml")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weightcache.app",
                "warm",
                f"oci://{proxy.host}/{repo}:v1",
                "--store",
                str(store),
                "--config",
                str(config),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"warm{n}.log").open("w"),
        )
        try:
            reached = hold.arrived.wait(120)
            assert reached, (
                "the fetch never reached the chosen moment: "
                + (tmp_path / f"warm{n}.log").read_text()[-2000:]
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            hold.release.set()
        # Right after the kill: nothing half-written is visible, the index is sound.
        if (store / "models").exists():
            corrupt_visible += _visible_and_correct(store, files)[1]
        with sqlite3.connect(store / "index.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        before = dict(proxy.state.blob_bytes_by_path)
        with proxy.state.lock:
            proxy.state.rules.clear()
        done = run_cli(
            "warm", f"oci://{proxy.host}/{repo}:v1", "--store", str(store), "--config", str(config)
        )
        assert done.returncode == 0, done.stderr
        visible, wrong = _visible_and_correct(store, files)
        corrupt_visible += wrong
        assert visible == FILES
        for rel, data in files.items():
            path = f"/v2/{repo}/blobs/sha256:{hashlib.sha256(data).hexdigest()}"
            fetched = proxy.state.blob_bytes_by_path.get(path, 0)
            twice = fetched - len(data)
            worst_refetch = max(worst_refetch, twice)
            # At most the parts that were in flight when the process died.
            assert twice <= RANGES * PART, (rel, before.get(path, 0), fetched, len(data))
    assert corrupt_visible == 0
    report(
        request.config,
        SECTION,
        f"crash: {kills} SIGKILLs mid-fetch ({FILES} files, {RANGES} range each): corrupt files "
        f"visible {corrupt_visible}, integrity_check ok after every kill, most bytes fetched "
        f"twice for one file {worst_refetch} (one part is {PART})",
    )
