"""Lint, types and layering are tests: ruff, mypy (generated code excluded) and import-linter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PACKAGES = ("app", "daemon", "csi", "proto", "testing")


def _run(cmd: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}"


def test_ruff() -> None:
    _run([str(BIN / "ruff"), "check", "."])
    _run([str(BIN / "ruff"), "format", "--check", "."])


def test_mypy(tmp_path: Path) -> None:
    # mypy cannot follow setuptools' editable-install finder, so give it the namespace
    # layout the installed distribution has: weightcache/<pkg> -> the top-level folder.
    ns = tmp_path / "weightcache"
    ns.mkdir()
    for pkg in PACKAGES:
        (ns / pkg).symlink_to(ROOT / pkg, target_is_directory=True)
    env = {**os.environ, "MYPYPATH": str(tmp_path)}
    args = [str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml")]
    args += [
        "--cache-dir",
        str(tmp_path / ".mypy_cache"),
        "--explicit-package-bases",
        "--namespace-packages",
    ]
    for pkg in PACKAGES:
        args += ["-p", f"weightcache.{pkg}"]
    _run(args, cwd=tmp_path, env=env)


def test_import_layering() -> None:
    _run([str(BIN / "lint-imports"), "--config", str(ROOT / "pyproject.toml")])
