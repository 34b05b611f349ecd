"""Mounting model trees into pods: a ``Mounter`` protocol with a real and a fake implementation.

The real one makes read-only (``ro,nosuid,nodev``) bind mounts with the mount(2) system call
(no helper process: a publish is two syscalls, not two forks of util-linux) and reads the
kernel's mount table from ``/proc/self/mountinfo``. The fake keeps its own table and
really creates and removes directories, for fast unit tests of the node service's logic.
Both treat "already gone" as success.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

MOUNTINFO = Path("/proc/self/mountinfo")
# <sys/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 0x1, 0x2, 0x4, 0x20, 0x1000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class MountError(Exception):
    """A mount or unmount failed; the message carries the command's own words."""


@dataclass(frozen=True)
class MountEntry:
    target: str
    root: str
    """The path inside the source filesystem that is mounted (the bind source, for binds)."""
    options: frozenset[str]
    device: str = ""
    """``major:minor`` of the mounted filesystem."""


def device_of(path: Path) -> str:
    """``major:minor`` of the filesystem holding ``path``, as mountinfo spells it."""
    dev = os.stat(path).st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


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
        out[target] = MountEntry(target, root, frozenset(options.split(",")), fields[2])
    return out


class SystemMounter:
    """Real bind mounts through mount(2) and umount2(2) (needs CAP_SYS_ADMIN)."""

    def bind_read_only(self, source: Path, target: Path) -> None:
        _mount(source, target, MS_BIND, f"mount --bind {source} {target}")
        try:
            # A bind mount takes its flags from a remount; until then it is read-write.
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
            _mount(source, target, flags, f"mount -o remount,bind,ro,nosuid,nodev {target}")
        except MountError:
            self.unmount(target)
            raise

    def unmount(self, target: Path) -> None:
        if _libc.umount2(os.fsencode(target), 0) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return  # not a mount point (any more), or gone: nothing to undo
        raise MountError(f"umount {target}: {os.strerror(err)}")

    def mounts(self) -> dict[str, MountEntry]:
        return parse_mountinfo(MOUNTINFO.read_text())


def _mount(source: Path, target: Path, flags: int, what: str) -> None:
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, flags, None) != 0:
        raise MountError(f"{what}: {os.strerror(ctypes.get_errno())}")


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
            str(target), str(source), frozenset({"ro", "nosuid", "nodev"}), device_of(source)
        )

    def unmount(self, target: Path) -> None:
        self.table.pop(str(target), None)

    def mounts(self) -> dict[str, MountEntry]:
        return dict(self.table)
