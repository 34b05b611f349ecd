"""``weightcache status``: the node's picture from the store (read, never changed or created) and
from the running agent's ``/status``, as a table or one JSON document on stdout."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers import run_cli

from weightcache.testing.models import sample_model, write_files
from weightcache.testing.services import free_port

DEADLINE_S = 30.0


def _listing(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size, the index's WAL files aside (SQLite's own)."""
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    } | {str(p.relative_to(root)) + "/": 0 for p in root.rglob("*") if p.is_dir()}


def _warmed_store(tmp_path: Path) -> tuple[Path, str]:
    ref = f"file://{write_files(tmp_path / 'src', sample_model(70, shard_bytes=64 * 1024))}"
    store = tmp_path / "store"
    warmed = run_cli("warm", ref, "--store", str(store))
    assert warmed.returncode == 0, warmed.stderr
    return store, ref


def test_status_of_a_missing_store_says_so_and_creates_nothing(tmp_path: Path) -> None:
    absent = tmp_path / "nothing"
    shown = run_cli("status", "--store", str(absent))
    assert shown.returncode == 1
    assert f"no store at {absent}" in shown.stderr
    assert shown.stdout == ""
    assert not absent.exists()
    as_json = run_cli("status", "--store", str(absent), "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["store"] is None
    empty = tmp_path / "empty"
    empty.mkdir()
    shown = run_cli("status", "--store", str(empty))
    assert shown.returncode == 1 and "holds no index.sqlite3" in shown.stderr
    assert list(empty.iterdir()) == []


def test_status_reads_the_store_without_changing_it(tmp_path: Path) -> None:
    store, ref = _warmed_store(tmp_path)
    (digest,) = (p.name for p in (store / "models").iterdir())
    shard = store / "models" / digest / "model-00002-of-00003.safetensors"
    shard.write_bytes(b"rot" + shard.read_bytes()[3:])
    assert run_cli("verify", "--store", str(store), "--full").returncode == 1
    before = _listing(store)
    nobody = f"127.0.0.1:{free_port()}"
    shown = run_cli("status", "--store", str(store), "--json", "--agent-address", nobody)
    assert shown.returncode == 1, shown.stderr  # a corrupt model is not healthy
    doc = json.loads(shown.stdout)
    assert _listing(store) == before
    assert doc["healthy"] is False
    assert doc["agent"] is None and "no agent answered" in doc["agent_error"]
    s = doc["store"]
    assert s["models_by_state"] == {"fetching": 0, "ready": 0, "failed": 0, "corrupt": 1}
    (model,) = s["models"]
    assert model["digest"] == f"sha256:{digest}" and model["ref"] == ref
    assert "model-00002-of-00003.safetensors" in model["error"]
    usage = s["usage"]
    assert 0 < usage["used_bytes"] <= usage["budget_bytes"]
    assert usage["low_watermark_bytes"] < usage["high_watermark_bytes"] < usage["budget_bytes"]
    assert usage["quarantine_bytes"] > 0
    assert 0 < usage["fs_free_bytes"] <= usage["fs_size_bytes"]
    (finding,) = s["scrub"]["recent_failures"]
    assert "model-00002-of-00003.safetensors" in finding["detail"]
    assert s["pins_by_kind"] == {"mount": 0, "warm": 0}
    table = run_cli("status", "--store", str(store), "--agent-address", nobody)
    assert table.returncode == 1
    for text in (f"store {store}", "1 corrupt", "sha256:", ref, "no agent answered"):
        assert text in table.stdout, table.stdout


def test_status_shows_the_running_agent(tmp_path: Path) -> None:
    store, ref = _warmed_store(tmp_path)
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text("[scrub]\nbytes_per_s = 4194304\n")
    agent = subprocess.Popen(
        [
            *(sys.executable, "-m", "weightcache.app", "node", "--no-kube"),
            *("--node-name", "n1", "--store", str(store)),
            *("--csi-endpoint", f"unix://{tmp_path}/csi.sock"),
            *("--metrics-address", f"127.0.0.1:{port}", "--config", str(config)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        doc: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
                    doc = json.loads(r.read())
            except (urllib.error.URLError, OSError):
                doc = {}
            scrub = doc.get("scrub")
            if isinstance(scrub, dict) and scrub["passes"] >= 1:
                break
            time.sleep(0.1)
        assert doc, "the agent never served /status"
        address = f"127.0.0.1:{port}"
        shown = run_cli(
            "status", "--store", str(store), "--config", str(config), "--agent-address", address
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        for text in ("agent     node n1, ready", "no warm controller", "complete pass(es)", ref):
            assert text in shown.stdout, shown.stdout
        as_json = run_cli("status", "--store", str(store), "--json", "--agent-address", address)
        status = json.loads(as_json.stdout)
        assert status["healthy"] is True
        assert status["agent"]["ready"] is True and status["agent"]["warm"] is None
        assert status["agent"]["scrub"]["passes"] >= 1
        assert status["store"]["models_by_state"]["ready"] == 1
        assert status["store"]["scrub"]["oldest_verified_age_s"] < DEADLINE_S + 60
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    assert agent.returncode == 0
