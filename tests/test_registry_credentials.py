"""Registry credentials from a mounted Secret follow the Secret: rotated on the registry and in
the file, the next fetch uses the new ones without a restart.

The file is laid out the way the kubelet lays out a Secret volume (``..data`` -> a timestamped
directory, the key a symlink through ``..data``) and rotated the way it rotates one: a new
directory, then an atomic swap of the ``..data`` symlink. The registry is the real one behind
the authenticating proxy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import dockerconfig, make_config

from weightcache.app.wiring import build_fetcher
from weightcache.daemon.config import RegistryConfig
from weightcache.daemon.errors import SourceError
from weightcache.daemon.references import parse_reference
from weightcache.daemon.sources.credentials import DockerConfigFile
from weightcache.daemon.store.store import Store
from weightcache.testing.faultproxy import FaultProxy
from weightcache.testing.models import ModelPublisher, sample_model

KEY = ".dockerconfigjson"


def _secret_volume(volume: Path, generation: int, content: str) -> None:
    """Write the Secret's next generation and swap ``..data`` to it, as the kubelet does."""
    data = volume / f"..2026_01_01_00_00_0{generation}.000000001"
    data.mkdir()
    (data / KEY).write_text(content)
    link = volume / f"..data_tmp{generation}"
    link.symlink_to(data.name)
    os.replace(link, volume / "..data")
    if not (volume / KEY).is_symlink():
        (volume / KEY).symlink_to(f"..data/{KEY}")


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_rotated_registry_credentials_are_used_without_a_restart(
    proxy: FaultProxy, publisher: ModelPublisher, tmp_path: Path, scheme: str
) -> None:
    publisher.oras("private/rotating", "v1", sample_model(31))
    publisher.oras("private/rotating", "v2", sample_model(32))
    proxy.state.auth = scheme
    volume = tmp_path / "registry-secret"
    volume.mkdir()
    _secret_volume(volume, 1, dockerconfig(proxy.host, "puller", "s3cret")[KEY])
    config = make_config(tmp_path / "store", registry=RegistryConfig(docker_config=volume / KEY))
    store = Store(config.store)
    fetcher = build_fetcher(config, store)  # built once, like the node agent
    try:
        first = fetcher.warm(parse_reference(f"oci://{proxy.host}/private/rotating:v1"))
        assert first.state == "ready"
        # The registry rotates the password; tokens it issued before are void.
        proxy.state.password = "r0tated"
        proxy.state.tokens.clear()
        _secret_volume(volume, 2, dockerconfig(proxy.host, "puller", "r0tated")[KEY])
        second = fetcher.warm(parse_reference(f"oci://{proxy.host}/private/rotating:v2"))
        assert second.state == "ready" and second.digest != first.digest
        sent = [auth for path, auth in proxy.state.seen_auth if auth]
        assert sent, "no credentials reached the registry"
    finally:
        fetcher.close()
        store.close()
        proxy.state.password = "s3cret"


def test_a_missing_secret_means_no_credentials_until_it_appears(tmp_path: Path) -> None:
    volume = tmp_path / "registry-secret"
    volume.mkdir()
    creds = DockerConfigFile(volume / KEY)  # optional Secret, not created yet
    assert dict(creds) == {}
    _secret_volume(volume, 1, dockerconfig("registry.example.com", "u", "p")[KEY])
    assert creds["registry.example.com"].password == "p"
    _secret_volume(volume, 2, dockerconfig("registry.example.com", "u", "q")[KEY])
    assert creds["registry.example.com"].password == "q"
    (volume / "..2026_01_01_00_00_03.000000001").mkdir()
    bad = volume / "..2026_01_01_00_00_03.000000001" / KEY
    bad.write_text("{not json")
    link = volume / "..data_tmp3"
    link.symlink_to(bad.parent.name)
    os.replace(link, volume / "..data")
    with pytest.raises(SourceError, match="is not valid"):
        creds.get("registry.example.com")
