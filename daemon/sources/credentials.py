"""Registry credentials that follow their file: a Kubernetes Secret mounted into the pod.

The kubelet updates a Secret volume by writing the new contents into a fresh directory and
swapping the ``..data`` symlink, so the file's path stays and its inode changes. Each lookup
stats the path (following the symlinks) and re-reads the file when its identity, size or
modification time differ from what was read last: a rotated registry token is used by the
next request, without a restart. A missing file means no credentials (the Secret is optional
and may appear later); a malformed one is refused with the reason, as at startup.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from weightcache.daemon.sources.oci_http import Credentials, parse_docker_config

log = logging.getLogger(__name__)
_Stamp = tuple[int, int, int, int]


class DockerConfigFile(Mapping[str, Credentials]):
    """Registry host -> credentials, from a docker config file read again when it changes."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: _Stamp | None = None
        self._by_host: dict[str, Credentials] = {}
        self._current()  # a malformed file is refused at startup

    def _current(self) -> dict[str, Credentials]:
        if self._path is None:
            return {}
        with self._lock:
            try:
                st = os.stat(self._path)
            except FileNotFoundError:
                if self._stamp != (0, 0, 0, 0):
                    log.warning("registry credentials %s: no such file; none used", self._path)
                self._stamp, self._by_host = (0, 0, 0, 0), {}
                return self._by_host
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                text = self._path.read_text()
                self._by_host = parse_docker_config(text, str(self._path))
                if self._stamp is not None:
                    log.info("registry credentials %s changed: read again", self._path)
                self._stamp = stamp
            return self._by_host

    def __getitem__(self, host: str) -> Credentials:
        return self._current()[host]

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._current()))

    def __len__(self) -> int:
        return len(self._current())
