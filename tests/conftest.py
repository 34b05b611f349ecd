"""Shared fixtures: real services on 127.0.0.1 with temporary storage, torn down afterwards.

A fixture whose binary or package is missing fails with the install command; it never skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_config

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.config import Config
from weightcache.daemon.fetcher import Fetcher
from weightcache.daemon.store.store import Store
from weightcache.testing.faultproxy import FaultProxy, run_fault_proxy
from weightcache.testing.models import ModelPublisher
from weightcache.testing.oci_push import RegistryPusher
from weightcache.testing.services import Registry, S3Endpoint, run_registry, run_s3


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real CNCF distribution registry (Debian's docker-registry) for the whole session."""
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture
def pusher(registry: Registry) -> RegistryPusher:
    return RegistryPusher(registry.url)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Endpoint]:
    """A real S3 endpoint: moto in server mode."""
    with run_s3() as endpoint:
        yield endpoint


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def publisher(pusher: RegistryPusher, tmp_path: Path) -> Iterator[ModelPublisher]:
    pub = ModelPublisher(pusher, tmp_path / "publish")
    pub.workdir.mkdir()
    yield pub
    pub.close()


@pytest.fixture(scope="session")
def _proxy(registry: Registry) -> Iterator[FaultProxy]:
    with run_fault_proxy(registry.url) as proxy:
        yield proxy


@pytest.fixture
def proxy(_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the registry, reset for each test."""
    _proxy.state.reset()
    _proxy.state.auth = ""
    yield _proxy
    _proxy.state.reset()
    _proxy.state.auth = ""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "store")


@pytest.fixture
def fetcher(config: Config) -> Iterator[Fetcher]:
    f = build_fetcher(config, Store(config.store))
    yield f
    f.close()
    f.store.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("weightcache reliability (tests/reliability)")
    group.addoption("--kills", type=int, default=10, help="SIGKILLs of a fetch (full run: 100)")
    group.addoption("--flips", type=int, default=20, help="byte flips in the store (full: 100)")
