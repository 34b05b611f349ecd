"""A fresh clone works anywhere: nothing committed points outside the repository or names a
path of the machine it was written on, and the set-up script finds the repository from wherever
it is cloned."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Home folders, build machines' work trees, and this checkout's own absolute path.
MACHINE_PATHS = re.compile(
    r"(?<![\w.])(/home/\w|/Users/\w|/root/|/work/|/tmp/peers|" + re.escape(str(ROOT)) + r")"
)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout


def test_no_committed_symlink_leaves_the_repository() -> None:
    leaving = []
    for line in _git("ls-files", "-s").splitlines():
        mode, _, _, path = line.split(maxsplit=3)
        if mode != "120000":
            continue
        target = _git("cat-file", "-p", f":{path}")
        resolved = (ROOT / path).parent / target
        if os.path.isabs(target) or not os.path.normpath(resolved).startswith(f"{ROOT}/"):
            leaving.append(f"{path} -> {target}")
    assert leaving == [], f"committed symlinks leave the repository: {leaving}"


def test_no_tracked_file_names_a_path_of_a_build_machine() -> None:
    hits = []
    for path in _git("ls-files").splitlines():
        full = ROOT / path
        if full.is_symlink() or not full.is_file() or full == Path(__file__).resolve():
            continue  # (this file spells the patterns out)
        data = full.read_bytes()
        if b"\0" in data:
            continue  # binary
        for number, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            if MACHINE_PATHS.search(line):
                hits.append(f"{path}:{number}: {line.strip()[:120]}")
    assert hits == [], "tracked files name machine-specific paths:\n" + "\n".join(hits)


def test_the_setup_script_finds_the_repository_from_any_location(tmp_path: Path) -> None:
    """scripts/dev run from a copy elsewhere (a path with a space), through a symlinked
    folder, and from another working directory takes that copy as its repository."""
    copy = tmp_path / "somewhere else" / "clone"
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    os.symlink(copy, tmp_path / "link")
    for script in (copy / "scripts" / "dev", tmp_path / "link" / "scripts" / "dev"):
        out = subprocess.run(
            ["bash", str(script), "no-such-command"],
            capture_output=True,
            text=True,
            cwd="/",
            check=False,
        )
        assert out.returncode == 2, out.stderr
        reported = re.search(r"\(repository: (.+)\)", out.stderr)
        assert reported is not None, out.stderr
        assert Path(reported.group(1)).resolve() == copy.resolve()
