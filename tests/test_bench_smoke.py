"""Each benchmark runs end to end at tiny sizes: every contender present and measured.

No timing is asserted here; the figures only mean something at full size (docs/performance.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(script: str, *args: str) -> tuple[object, str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout), out.stderr


@pytest.mark.bench
def test_fetch_oci_smoke() -> None:
    rows, table = _bench("fetch_oci.py", "--shards", "2", "--shard-mib", "4")
    assert isinstance(rows, list)
    names = [r["name"] for r in rows]
    assert names[0].startswith("weightcache warm")
    for peer in ("curl -o + sync", "curl -o (", "dd conv=fsync", "oras", "kserve-storage"):
        assert any(peer in n for n in names), peer
    assert all(r["nbytes"] == 2 * 4 * 1024 * 1024 and r["seconds"] > 0 for r in rows)
    assert all(r["peak_rss"] > 0 for r in rows)
    assert "weightcache / it" in table


@pytest.mark.bench
def test_fetch_s3_smoke() -> None:
    rows, table = _bench("fetch_s3.py", "--shards", "2", "--shard-mib", "4")
    assert isinstance(rows, list)
    names = [r["name"] for r in rows]
    for peer in ("weightcache warm", "curl -o presigned + sync", "s5cmd", "boto3", "dd oflag"):
        assert any(peer in n for n in names), peer
    assert all(r["seconds"] > 0 and r["peak_rss"] > 0 for r in rows)
    assert all(r["cpu_seconds"] > 0 and r["cpu_s_per_gib"] > 0 for r in rows)
    assert rows[0]["server_cpu"] >= 0
    assert "CPU s/GiB" in table and "bound: " in table
    assert table.count("PASS") + table.count("MISS") == 2


@pytest.mark.bench
def test_hashing_smoke() -> None:
    doc, table = _bench("hashing.py", "--mib", "16", "--threads", "2")
    assert isinstance(doc, dict)
    costs = doc["cpu_s_per_gib"]
    assert set(costs) == {"sha256", "md5", "xxh3-128"} and all(c > 0 for c in costs.values())
    assert [len(doc["scaling_bytes_per_s"][h]) for h in ("sha256", "xxh3-128")] == [2, 2]
    assert doc["fetch_cpu_s_per_gib"] > costs["sha256"]
    assert len(doc["projection"]) == 4 and all(p["sha256_threads"] >= 1 for p in doc["projection"])
    assert "default files_in_parallel on 128 cores" in table
    assert "PASS" in table or "MISS" in table


@pytest.mark.bench
def test_store_scale_smoke() -> None:
    doc, table = _bench("store_scale.py", "--files", "200")
    assert isinstance(doc, dict)
    assert doc["files"] == 400 and doc["blobs"] == 300
    assert "weightcache ls --json" in table


@pytest.mark.bench
def test_publish_latency_smoke(tmp_path: Path) -> None:
    rows, table = _bench(
        "publish_latency.py",
        *("--small-gib", "0.01", "--large-gib", "0.05"),
        *("--small-files", "2", "--large-files", "8", "--calls", "20"),
        *("--load-files", "2", "--load-mib", "64"),
        *("--workdir", str(tmp_path)),
    )
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    calls = [r for r in rows if r["name"].startswith(("NodePublishVolume", "NodeUnpublishVolume"))]
    assert [r["name"].split(",")[0] for r in calls] == [
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodePublishVolume",
    ]
    assert calls[-1]["name"].endswith("under load")
    for r in calls:
        assert 1 <= r["calls"] <= 20
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert "publish p99, idle" in table and "publish p99, under load" in table
    assert ("PASS" in table or "MISS" in table) and "MB/s (alone:" in table
    copies = [n for n in by_name if n.startswith("cp -r + sync")]
    floors = [n for n in by_name if n.startswith("network floor")]
    assert len(copies) == 2 and any("extrapolated" in n for n in copies)
    assert len(floors) == 2
    assert all(by_name[n]["seconds"] > 0 for n in copies + floors)
    assert "p99 ms" in table
    mounted = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounted
    assert list(tmp_path.iterdir()) == []  # the bench's temp dir is gone


@pytest.mark.bench
def test_scrub_smoke(tmp_path: Path) -> None:
    rows, table = _bench(
        "scrub.py",
        *("--gib", "0.03", "--files", "3", "--cap-mib", "20"),
        "--workdir",
        str(tmp_path),
    )
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    assert list(by_name) == [
        "cat > /dev/null",
        "dd bs=16M iflag=direct",
        "weightcache scrub, no cap",
        "weightcache scrub, capped",
    ]
    nbytes = int(0.03 * 1024**3)
    for r in rows:
        assert r["nbytes"] == nbytes and r["seconds"] > 0 and r["mb_s"] > 0
        assert r["cpu_seconds"] > 0 and r["cpu_s_per_gib"] > 0
    capped = by_name["weightcache scrub, capped"]
    assert 0 < capped["cap_bytes_per_s"] <= 20 * 1024**2
    assert isinstance(capped["within_10pct"], bool)
    assert by_name["weightcache scrub, no cap"]["best"] in (
        "cat > /dev/null",
        "dd bs=16M iflag=direct",
    )
    # cat fills the page cache with the blobs; the O_DIRECT scrub leaves none of them there
    assert by_name["cat > /dev/null"]["cached_after_bytes"] > 0
    assert by_name["weightcache scrub, no cap"]["cached_after_bytes"] == 0
    assert by_name["weightcache scrub, capped"]["cached_after_bytes"] == 0
    assert "it / best reader" in table and "CPU s/GiB" in table
    assert "page cache" in table and ("PASS" in table or "MISS" in table)
    assert list(tmp_path.iterdir()) == []  # the bench's temp dir is gone


@pytest.mark.bench
def test_signing_smoke(tmp_path: Path) -> None:
    rows, table = _bench(
        "signing.py",
        *("--shards", "3", "--shard-mib", "2", "--repeats", "3"),
        "--workdir",
        str(tmp_path),
    )
    assert isinstance(rows, list)
    figures = {r["name"]: r["seconds"] for r in rows if "name" in r}
    assert list(figures) == [
        "fetch, no signing rule",
        "fetch, require rule",
        "verify at end of fetch",
        "model_signing verify",
        "authorize, no signing rule",
        "authorize, stored result",
        "authorize, re-verify",
    ]
    assert all(s > 0 for s in figures.values())
    verdicts = [r for r in rows if "verdict" in r]
    assert len(verdicts) == 3 and all(isinstance(v["pass"], bool) for v in verdicts)
    assert table.count("PASS") + table.count("MISS") == 3
    assert list(tmp_path.iterdir()) == []


@pytest.mark.bench
def test_small_files_smoke() -> None:
    rows, table = _bench("small_files.py", "--files", "60", "--file-bytes", "2048")
    assert isinstance(rows, list)
    assert [r["peer"] for r in rows] == ["tar -x + sync", "cp -r + sync"]
    assert all(r["seconds"] > 0 and r["peer_seconds"] > 0 for r in rows)
    assert all(r["verdict"] in ("PASS", "MISS") for r in rows)
    assert table.count("PASS") + table.count("MISS") == 2
