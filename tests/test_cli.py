"""The CLI contract: every subcommand exists; unfinished ones say so and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import run_cli

CONTRACT = ("warm", "ls", "verify", "gc", "node", "controller", "demo")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=120)


def test_help_lists_every_contract_subcommand() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    for name in CONTRACT:
        assert f"    {name} " in out.stdout, name


@pytest.mark.parametrize(
    "args",
    [
        ["warm", "oci://127.0.0.1:5000/m:v1", "--store", "/nonexistent", "--json"],
        ["ls", "--store", "/nonexistent", "--json"],
        ["verify", "--full", "--json"],
        ["gc", "--target-bytes", "10"],
        ["node", "--no-kube", "--node-name", "n1", "--csi-endpoint", "unix:///tmp/x.sock"],
        ["controller", "--csi-endpoint", "unix:///tmp/y.sock"],
    ],
)
def test_each_subcommand_parses_its_contract_flags(args: list[str]) -> None:
    out = _cli(*args, "--help")
    assert out.returncode == 0, out.stderr
    assert f"usage: weightcache {args[0]}" in out.stdout


def test_kubeconfig_and_no_kube_are_exclusive() -> None:
    out = _cli("node", "--no-kube", "--kubeconfig", "/x")
    assert out.returncode == 2
    assert "not allowed with argument" in out.stderr


def test_console_script_is_installed() -> None:
    from pathlib import Path

    script = Path(sys.executable).parent / "weightcache"
    assert script.exists()
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0
    assert out.stdout.startswith("weightcache ")


def test_demo_runs_the_whole_flow() -> None:
    out = _cli("demo")
    assert out.returncode == 0, out.stderr[-3000:]
    for step in (
        "files identical",
        "verify --full",
        "[('model-00002-of-00004.safetensors', (1,))] (file, chunk)",
        "repair by range: fetched 4 MiB of the 8 MiB file; ready",
        "every model: ['ready']",
        "writing refused: True",
        "unmounted and removed: True; pins left: 0",
        "this node fetched it before any pod arrived",
        "events ['WarmReady', 'WarmStarted']",
        "demo: done",
    ):
        assert step in out.stderr, step
