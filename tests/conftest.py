"""Shared fixtures: real services on 127.0.0.1 with temporary storage, torn down afterwards.

A fixture whose binary or package is missing fails with the install command; it never skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
