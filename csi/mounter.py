"""Mounting model trees into pods: a ``Mounter`` protocol with a real and a fake implementation.

The real one makes read-only (``ro,nosuid,nodev``) bind mounts with util-linux ``mount`` and
reads the kernel's mount table from ``/proc/self/mountinfo``. The fake keeps its own table and
really creates and removes directories, for fast unit tests of the node service's logic.
Both treat "already gone" as success.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MOUNTINFO = Path("/proc/self/mountinfo")
READ_ONLY_OPTIONS = "remount,bind,ro,nosuid,nodev"


class MountError(Exception):
    """A mount or unmount failed; the message carries the command's own words."""


@dataclass(frozen=True)
class MountEntry:
    target: str
    root: str
    """The path inside the source filesystem that is mounted (the bind source, for binds)."""
    options: frozenset[str]


class Mounter(Protocol):
    def bind_read_only(self, source: Path, target: Path) -> None:
        """Bind-mount ``source`` at ``target`` (an existing directory), read-only."""
        ...

    def unmount(self, target: Path) -> None:
        """Unmount ``target``; not mounted is not an error."""
        ...

    def mounts(self) -> dict[str, MountEntry]:
        """The current mounts by target path."""
        ...


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def parse_mountinfo(text: str) -> dict[str, MountEntry]:
    """Mount entries by target from the text of ``/proc/<pid>/mountinfo``."""
    out: dict[str, MountEntry] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10:
            continue
        root, target, options = _unescape(fields[3]), _unescape(fields[4]), fields[5]
        out[target] = MountEntry(target, root, frozenset(options.split(",")))
    return out


class SystemMounter:
    """Real bind mounts through util-linux ``mount``/``umount`` (needs CAP_SYS_ADMIN)."""

    def _run(self, *args: str) -> None:
        out = subprocess.run(args, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise MountError(f"{' '.join(args)}: {out.stderr.strip() or out.returncode}")

    def bind_read_only(self, source: Path, target: Path) -> None:
        self._run("mount", "--bind", str(source), str(target))
        try:
            # A bind mount takes its flags from a remount; until then it is read-write.
            self._run("mount", "-o", READ_ONLY_OPTIONS, str(target))
        except MountError:
            self.unmount(target)
            raise

    def unmount(self, target: Path) -> None:
        if str(target) not in self.mounts():
            return
        out = subprocess.run(["umount", str(target)], capture_output=True, text=True, check=False)
        if out.returncode != 0 and str(target) in self.mounts():
            raise MountError(f"umount {target}: {out.stderr.strip()}")

    def mounts(self) -> dict[str, MountEntry]:
        return parse_mountinfo(MOUNTINFO.read_text())


class FakeMounter:
    """A mount table in memory; directories are real so the node service's fs logic runs."""

    def __init__(self) -> None:
        self.table: dict[str, MountEntry] = {}

    def bind_read_only(self, source: Path, target: Path) -> None:
        if not source.is_dir():
            raise MountError(f"mount --bind {source} {target}: source is not a directory")
        if not target.is_dir():
            raise MountError(f"mount --bind {source} {target}: target is not a directory")
        self.table[str(target)] = MountEntry(
            str(target), str(source), frozenset({"ro", "nosuid", "nodev"})
        )

    def unmount(self, target: Path) -> None:
        self.table.pop(str(target), None)

    def mounts(self) -> dict[str, MountEntry]:
        return dict(self.table)


def is_stale(target: Path) -> bool:
    """True when ``target`` is a mount point whose filesystem is gone (ENOTCONN / ESTALE)."""
    try:
        os.stat(target)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ESTALE)
    return False
