"""Real local services on 127.0.0.1: a CNCF distribution registry and a moto S3 endpoint.

Each service is a context manager that starts the real server on a free loopback port with
temporary storage, waits until it answers, and stops it on exit. A missing binary or package
raises :class:`ServiceUnavailable` with the command that installs it: callers fail, never skip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import urllib3

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REGISTRY_BINARY = "docker-registry"
REGISTRY_INSTALL = "apt-get update && apt-get install -y docker-registry"
MOTO_INSTALL = "pip install 'moto[server]'"
STARTUP_TIMEOUT_S = 30.0


class ServiceUnavailable(RuntimeError):
    """A service could not be started; the message says how to fix it."""


@dataclass(frozen=True)
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT``, ``url`` its plain-HTTP base URL."""

    host: str
    storage: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3 endpoint with fixed test credentials."""

    url: str
    region: str = "us-east-1"
    access_key: str = "testing"
    secret_key: str = "testing"

    def client(self) -> S3Client:
        """A boto3 S3 client bound to this endpoint."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point the standard AWS chain at this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _registry_config(storage: Path, port: int) -> str:
    return "\n".join(
        [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {storage}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{port}",
            f"  secret: {os.urandom(16).hex()}",
            "",
        ]
    )


def _wait_until_answers(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``url`` until it answers, the process exits, or the deadline passes."""
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=0.5, read=2.0))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise ServiceUnavailable(
                f"{proc.args!r} exited with {proc.returncode}; log:\n{_tail(log)}"
            )
        with contextlib.suppress(urllib3.exceptions.HTTPError):
            http.request("GET", url)
            return
        if time.monotonic() > deadline:
            raise ServiceUnavailable(
                f"{proc.args!r} did not answer on {url} within {STARTUP_TIMEOUT_S}s; "
                f"log:\n{_tail(log)}"
            )
        # A readiness probe: the process is starting; its socket is not yet bound.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(no log: {exc})"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def run_registry(workdir: Path) -> Iterator[Registry]:
    """Start Debian's ``docker-registry`` (CNCF distribution v2) on a free loopback port."""
    binary = shutil.which(REGISTRY_BINARY)
    if binary is None:
        raise ServiceUnavailable(
            f"{REGISTRY_BINARY} is not installed; install it with: {REGISTRY_INSTALL}"
        )
    storage = workdir / "registry-storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "registry.yml"
    config.write_text(_registry_config(storage, port))
    log = workdir / "registry.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [binary, "serve", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        registry = Registry(host=f"127.0.0.1:{port}", storage=storage, log=log)
        _wait_until_answers(f"{registry.url}/v2/", proc, log)
        yield registry
    finally:
        _stop(proc)


@contextlib.contextmanager
def run_s3() -> Iterator[S3Endpoint]:
    """Start moto's S3 server (in this process, on its own threads) on a free loopback port."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise ServiceUnavailable(
            f"moto's server mode is not installed ({exc}); install it with: {MOTO_INSTALL}"
        ) from exc
    # werkzeug logs every request at INFO on stderr; keep the caller's output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Endpoint(url=f"http://{host}:{port}")
    finally:
        server.stop()
