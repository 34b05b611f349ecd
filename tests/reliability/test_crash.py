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


SMALL_FILES = 600
SMALL_BYTES = 4096


def test_sigkill_during_batched_commits_of_small_files(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Kills while a model of many small files commits in batches: after each kill every blob
    the index names is on disk with its content, nothing unverified is under blobs/ or
    models/, and the restart fetches again at most the batch that was not committed (plus the
    files in flight)."""
    from weightcache.daemon.store.store import BATCH_FILES

    kills = max(2, request.config.getoption("--kills") // 3)
    rng = random.Random(17)
    worst_refetched = 0
    for n in range(kills):
        files = {f"d{i % 7}/f{i:04d}.bin": rng.randbytes(SMALL_BYTES) for i in range(SMALL_FILES)}
        repo = f"crash/small{n}"
        publisher.oras(repo, "v1", files)
        # A file after the first batch: at least one batch is committed when the kill comes.
        victim = sorted(files)[rng.randint(BATCH_FILES + FILES, SMALL_FILES - 1)]
        sha = hashlib.sha256(files[victim]).hexdigest()
        hold = Hold()
        with proxy.state.lock:
            proxy.state.rules.clear()
            proxy.state.blob_bytes_by_path.clear()
        proxy.state.rules.append(Rule(rf"/blobs/sha256:{sha}", before=hold))
        store = tmp_path / f"small{n}"
        config = _config(tmp_path / f"small{n}.toml")
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
            stderr=(tmp_path / f"small{n}.log").open("w"),
        )
        try:
            reached = hold.arrived.wait(120)
            assert reached, (
                "the fetch never reached the chosen file: "
                + (tmp_path / f"small{n}.log").read_text()[-2000:]
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            hold.release.set()
        by_sha = {hashlib.sha256(d).hexdigest(): d for d in files.values()}
        with sqlite3.connect(store / "index.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            named = [
                str(r[0]).removeprefix("sha256:") for r in db.execute("SELECT sha256 FROM blobs")
            ]
        assert named, "no batch was committed before the kill"
        for hexd in named:
            blob = store / "blobs" / "sha256" / hexd[:2] / hexd
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == hexd
        for blob in (store / "blobs").rglob("*"):
            if blob.is_file():
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
                assert blob.name in by_sha
        if (store / "models").exists():
            assert _visible_and_correct(store, files)[1] == 0
        fetched_before = {p for p, b in proxy.state.blob_bytes_by_path.items() if b}
        with proxy.state.lock:
            proxy.state.rules.clear()
            proxy.state.blob_bytes_by_path.clear()
        done = run_cli(
            "warm", f"oci://{proxy.host}/{repo}:v1", "--store", str(store), "--config", str(config)
        )
        assert done.returncode == 0, done.stderr
        visible, wrong = _visible_and_correct(store, files)
        assert (visible, wrong) == (SMALL_FILES, 0)
        refetched = sum(
            1
            for p, b in proxy.state.blob_bytes_by_path.items()
            if b and p in fetched_before and p.rsplit(":", 1)[-1] in by_sha
        )
        worst_refetched = max(worst_refetched, refetched)
        assert refetched <= BATCH_FILES + FILES, refetched
        assert len(named) >= BATCH_FILES
    report(
        request.config,
        SECTION,
        f"crash: {kills} SIGKILLs while {SMALL_FILES} small files commit in batches of "
        f"{BATCH_FILES}: every indexed blob on disk and intact after each kill, most files "
        f"fetched twice {worst_refetched} (at most a batch and the files in flight)",
    )
