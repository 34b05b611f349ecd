"""The store commands through the real console entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PART, Hold, run_cli

from weightcache.testing.faultproxy import FaultProxy, Rule
from weightcache.testing.models import ModelPublisher, sample_model, write_files


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


@pytest.mark.parametrize("ref", ["oci://r.io/UPPER:v1", "http://x/y", "file://rel/dir", "s3://"])
def test_warm_with_a_malformed_reference_exits_2_and_changes_nothing(
    tmp_path: Path, ref: str
) -> None:
    store = tmp_path / "store"
    out = _cli("warm", ref, "--store", str(store), "--json")
    assert out.returncode == 2
    assert ref.split("://")[0] in out.stderr or "scheme" in out.stderr
    assert out.stdout == ""
    assert not store.exists()


def test_warm_json_and_ls(tmp_path: Path) -> None:
    files = sample_model(60)
    src = write_files(tmp_path / "src", files)
    store = tmp_path / "store"
    out = _cli("warm", f"file://{src}", "--store", str(store), "--json")
    assert out.returncode == 0, out.stderr
    (model,) = json.loads(out.stdout)["models"]
    assert model["state"] == "ready" and model["files"] == len(files)
    assert Path(model["path"]).is_dir()
    ls = _cli("ls", "--store", str(store))
    assert ls.returncode == 0
    assert model["digest"][:19] in ls.stdout and "ready" in ls.stdout


def test_warm_failure_exits_1_with_the_reason(tmp_path: Path) -> None:
    out = _cli("warm", f"file://{tmp_path}/missing", "--store", str(tmp_path / "s"), "--json")
    assert out.returncode == 1
    (model,) = json.loads(out.stdout)["models"]
    assert model["state"] == "failed" and "does not exist" in model["error"]


def test_ls_shows_progress_of_a_fetch_in_flight(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path
) -> None:
    files = {"w.bin": os.urandom(4 * PART)}
    publisher.oras("cli/progress", "v1", files)
    hold = Hold()
    proxy.state.rules.append(Rule(r"/blobs/sha256:", range_from=2 * PART, before=hold))
    config = tmp_path / "wc.toml"
    config.write_text(f"[fetch]\npart_bytes = {PART}\nranges_per_file = 1\n")
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "weightcache.app",
            "warm",
            f"oci://{proxy.host}/cli/progress:v1",
            "--store",
            str(store),
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert hold.arrived.wait(120)
        ls = json.loads(_cli("ls", "--store", str(store), "--json").stdout)
        (model,) = ls["models"]
        assert model["state"] == "fetching"
        assert model["bytes_total"] == 4 * PART
        assert 0 < model["bytes_done"] <= 2 * PART
        human = _cli("ls", "--store", str(store)).stdout
        assert "fetching" in human and "/4.0 MiB" in human
    finally:
        hold.release.set()
        proc.wait(120)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert "4.0 MiB / 4.0 MiB (100%)" in (proc.stderr.read() if proc.stderr else "")
