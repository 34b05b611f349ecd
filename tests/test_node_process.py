"""`weightcache node` as a real process: serves CSI on its socket, restarts without touching
live mounts, and reconciles mount pins with the kernel's mount table on start."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
from helpers import run_cli

from weightcache.csi.mounter import SystemMounter
from weightcache.daemon.config import StoreConfig
from weightcache.daemon.kube.naming import WARM_ANNOTATION, label_key
from weightcache.daemon.references import parse_reference
from weightcache.daemon.store.store import Store
from weightcache.proto import csi_pb2, csi_pb2_grpc
from weightcache.testing.fake_kube import deployment, run_fake_kube
from weightcache.testing.fake_kube import node as fake_node
from weightcache.testing.models import sample_model, write_files
from weightcache.testing.services import free_port

CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)


def _node_config(tmp_path: Path) -> str:
    """The node's config file: models may come from ``src/``, pods live under ``pods/``."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[policy]\nfile_roots = ["{tmp_path / "src"}"]\n'
        f'[csi]\nkubelet_dir = "{tmp_path / "pods"}"\n'
    )
    return str(path)


def _start(store: Path, endpoint: str, metrics_port: int) -> subprocess.Popen[str]:
    return _spawn(
        *("node", "--no-kube", "--node-name", "n1", "--store", str(store)),
        *("--csi-endpoint", endpoint, "--metrics-address", f"127.0.0.1:{metrics_port}"),
        *("--config", _node_config(store.parent)),
    )


def _scrape(port: int) -> dict[str, float]:
    """The node's /metrics, over HTTP, as {series: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "weightcache.app", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _until_serving(proc: subprocess.Popen[str]) -> str:
    """Read the agent's log until it says it serves; return what it logged so far."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "serving CSI" in line:
            return "".join(seen)
    raise AssertionError(f"the plugin exited before serving:\n{''.join(seen)}")


async def _identity(endpoint: str) -> tuple[csi_pb2.GetPluginInfoResponse, bool]:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        identity = csi_pb2_grpc.IdentityStub(channel)
        probe = await identity.Probe(csi_pb2.ProbeRequest())
        return await identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()), probe.ready.value


async def _publish(endpoint: str, ref: str, target: Path) -> None:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        await csi_pb2_grpc.NodeStub(channel).NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id="v",
                target_path=str(target),
                volume_capability=CAP,
                volume_context={"model": ref},
            )
        )


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def test_node_restart_keeps_mounts_and_reconciles_pins(tmp_path: Path) -> None:
    files = sample_model(80)
    ref = f"file://{write_files(tmp_path / 'src', files)}"
    store_dir = tmp_path / "store"
    assert run_cli("warm", ref, "--store", str(store_dir)).returncode == 0
    endpoint = f"unix://{tmp_path}/csi/csi.sock"
    target = tmp_path / "pods" / "p" / "model"
    mounter = SystemMounter()
    port = free_port()
    proc = _start(store_dir, endpoint, port)
    try:
        _until_serving(proc)
        info, ready = asyncio.run(_identity(endpoint))
        assert info.name == "csi.weightcache.io" and ready
        asyncio.run(_publish(endpoint, ref, target))
        metrics = _scrape(port)
        assert metrics["weightcache_mounts"] == 1
        assert metrics['weightcache_publish_total{result="hit"}'] == 1
        assert metrics["weightcache_publish_duration_seconds_count"] == 1
        assert metrics['weightcache_models{state="ready"}'] == 1
        assert metrics['weightcache_store_bytes{state="ready"}'] == sum(map(len, files.values()))
        _stop(proc)
        # The agent is down; the pod still reads its model.
        assert (target / "config.json").read_bytes() == files["config.json"]
        # A pin whose mount vanished while the agent was down (a reboot, a manual umount).
        store = Store(StoreConfig(root=store_dir))
        (digest,) = {m for m, _, _ in store.pins()}
        store.pin(digest, "mount", str(tmp_path / "gone"))
        store.close()
        proc = _start(store_dir, endpoint, port)
        logged = _until_serving(proc)
        assert "dropped the pin of" in logged and "gone" in logged
        assert asyncio.run(_identity(endpoint))[1]
        assert str(target) in mounter.mounts()  # untouched by the restart
        store = Store(StoreConfig(root=store_dir))
        assert [(k, h) for _, k, h in store.pins()] == [("mount", str(target))]
        store.close()
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        mounter.unmount(target)


def test_controller_process_serves_identity_and_controller(tmp_path: Path) -> None:
    files = sample_model(81)
    ref = f"file://{write_files(tmp_path / 'src', files)}"
    endpoint = f"unix://{tmp_path}/ctrl/csi.sock"
    proc = _spawn("controller", "--csi-endpoint", endpoint)

    async def calls() -> tuple[str, int, str]:
        async with grpc.aio.insecure_channel(endpoint) as channel:
            info = await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest()
            )
            created = await csi_pb2_grpc.ControllerStub(channel).CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-1", volume_capabilities=[CAP], parameters={"model": ref}
                )
            )
            return info.name, created.volume.capacity_bytes, created.volume.volume_id

    try:
        _until_serving(proc)
        name, capacity, volume_id = asyncio.run(calls())
        assert name == "csi.weightcache.io"
        assert capacity == sum(map(len, files.values()))  # resolved through the real source
        assert volume_id.startswith("wc-")
        assert "CreateVolume" in _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_node_process_warms_what_the_cluster_asks_for(tmp_path: Path) -> None:
    ref = f"file://{write_files(tmp_path / 'src', sample_model(82))}"
    key = label_key(parse_reference(ref))
    port = free_port()
    with run_fake_kube() as kube:
        kube.put(fake_node("gpu-1"))
        kube.put(deployment("llama", "team-a", annotations={WARM_ANNOTATION: ref}))
        proc = _spawn(
            "node",
            "--kubeconfig",
            str(kube.kubeconfig(tmp_path)),
            "--node-name",
            "gpu-1",
            "--store",
            str(tmp_path / "store"),
            "--csi-endpoint",
            f"unix://{tmp_path}/csi.sock",
            "--metrics-address",
            f"127.0.0.1:{port}",
            "--config",
            _node_config(tmp_path),
        )
        try:
            logged = _until_serving(proc)
            assert "warm controller watching workloads for node gpu-1" in logged
            labelled = kube.wait_until(
                lambda: key in (kube.get("Node", "", "gpu-1") or {})["metadata"]["labels"], 60
            )
            assert labelled, "the node was never labelled"
            told = kube.wait_until(
                lambda: "WarmReady" in [e["reason"] for e in kube.objects("Event")], 60
            )
            assert told, "no WarmReady event"
            metrics = _scrape(port)
            assert metrics['weightcache_warm_requests{state="ready"}'] == 1
            assert metrics['weightcache_fetch_bytes_total{source="file"}'] > 0
            assert metrics["weightcache_fetch_duration_seconds_count"] == 1
            _stop(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
    store = Store(StoreConfig(root=tmp_path / "store"))
    assert [(k, h) for _, k, h in store.pins()] == [("warm", "Deployment/team-a/llama")]
    store.close()
