"""deploy/monitoring proven on a real Prometheus.

A node agent runs as a real process (``weightcache --log-format json node``) against the fake
Kubernetes API: it warms a model a Deployment asks for, fails to warm one bigger than its budget,
mounts the model into a pod directory, refuses a mount the policy forbids, scrubs, and finds a
file damaged on disk. Debian's ``prometheus`` scrapes it every second on loopback with the
shipped alert rules loaded. Every panel query of the shipped dashboard and every alert
expression runs through Prometheus's HTTP API; the corruption alert fires. promtool checks the
rules and runs their unit tests (tests/monitoring/rules_test.yaml). The agent's JSON log lines
parse and name the model.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from helpers import run_cli

from weightcache.csi.mounter import SystemMounter
from weightcache.daemon.kube.naming import WARM_ANNOTATION
from weightcache.daemon.metrics import Metrics
from weightcache.proto import csi_pb2, csi_pb2_grpc
from weightcache.testing.fake_kube import deployment, run_fake_kube
from weightcache.testing.fake_kube import node as fake_node
from weightcache.testing.models import sample_model, write_files
from weightcache.testing.services import ServiceUnavailable, free_port

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
RULES_TEST = Path(__file__).resolve().parent / "monitoring" / "rules_test.yaml"
PROMETHEUS_INSTALL = "apt-get update && apt-get install -y prometheus"
DEADLINE_S = 45.0
NODE = "gpu-1"
CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(
        mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
    ),
)
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$node": ".*",
}
"""What Grafana substitutes, as it would for "All" nodes on a short time range."""


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServiceUnavailable(f"{name} is not installed; install it with: {PROMETHEUS_INSTALL}")
    return path


def _until(what: str, check: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


# -- the shipped files -------------------------------------------------------------------------


def _rule_groups() -> dict[str, Any]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    spec: dict[str, Any] = rule["spec"]
    return spec


def _alerts() -> list[dict[str, Any]]:
    return [r for g in _rule_groups()["groups"] for r in g["rules"] if "alert" in r]


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    return doc


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]


def _grafana(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def _write_rules(directory: Path) -> Path:
    path = directory / "weightcache.rules.yaml"
    path.write_text(yaml.safe_dump(_rule_groups()))
    return path


def test_promtool_checks_the_rules_and_runs_their_unit_tests(tmp_path: Path) -> None:
    promtool = _binary("promtool")
    rules = _write_rules(tmp_path)
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in checked.stdout
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    tested = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    # Every alert has a unit test that makes it fire.
    unit = yaml.safe_load(RULES_TEST.read_text())
    fired = {
        case["alertname"]
        for test in unit["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == {a["alert"] for a in _alerts()}


def test_every_alert_has_a_runbook_entry() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"^#{2,4} (.+)$", operations, re.MULTILINE)}
    for alert in _alerts():
        name = alert["alert"]
        assert name in headings, f"docs/operations.md has no runbook heading for {name}"
        assert alert["annotations"]["runbook_url"] == f"docs/operations.md#{name.lower()}"
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_the_dashboard_has_what_grafana_requires() -> None:
    dash = _dashboard()
    for key in ("title", "uid", "panels", "schemaVersion", "templating", "time"):
        assert key in dash, f"dashboard.json has no {key}"
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    node = variables["node"]
    assert node["type"] == "query" and node["includeAll"] and node["allValue"] == ".*"
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in _panels(dash):
        for key in ("id", "type", "title", "gridPos"):
            assert key in panel, f"panel {panel.get('title')!r} has no {key}"
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
        for target in panel["targets"]:
            assert 'node=~"$node"' in target["expr"], f"{panel['title']}: ignores $node"
    titles = " / ".join(p["title"] for p in _panels(dash)).lower()
    for wanted in (
        "budget and reserve",
        "models by state",
        "fetch throughput",
        "fetch failures by reason",
        "publish latency",
        "hit ratio",
        "bytes verified",
        "corruptions found",
        "evictions",
        "warm requests by state",
        "time since the last full pass",
    ):
        assert wanted in titles, f"the dashboard has no panel for {wanted}"


def test_the_component_ships_the_dashboard_as_a_sidecar_configmap() -> None:
    component = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    for resource in component["resources"]:
        assert (MONITORING / resource).is_file(), f"{resource} is listed but missing"
    (generator,) = component["configMapGenerator"]
    key, _, source = generator["files"][0].partition("=")
    assert key.endswith(".json") and (MONITORING / source).is_file()
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"
    assert generator["options"]["disableNameSuffixHash"] is True


# -- Prometheus, for real ----------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        status, body = _get(f"{self.url}/api/v1/{path}?{query}")
        assert status == 200, f"{path} {params}: HTTP {status} {body[:500]!r}"
        doc = json.loads(body)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, seconds: float) -> list[dict[str, Any]]:
        end = time.time()
        data = self.api("query_range", query=expr, start=str(end - seconds), end=str(end), step="1")
        result: list[dict[str, Any]] = data["result"]
        return result


def _run_prometheus(workdir: Path, target: str, rules: Path) -> Prometheus:
    binary = _binary("prometheus")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "weightcache",
                        "scrape_timeout": "900ms",
                        "static_configs": [{"targets": [target], "labels": {"node": NODE}}],
                    }
                ],
            }
        )
    )
    log = workdir / "prometheus.log"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)

    def is_ready() -> bool:
        if proc.poll() is not None:
            raise ServiceUnavailable(f"prometheus exited:\n{log.read_text()[-3000:]}")
        return _get(f"{prom.url}/-/ready")[0] == 200

    _until("prometheus to be ready", is_ready)
    return prom


def _stop(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _publish(endpoint: str, ref: str, target: Path) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        try:
            await csi_pb2_grpc.NodeStub(channel).NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id="v",
                    target_path=str(target),
                    volume_capability=CAP,
                    volume_context={"model": ref},
                )
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def _series_selectors(expr: str) -> list[str]:
    """The ``weightcache_*`` series an expression reads, with their label matchers."""
    return re.findall(r"weightcache_[a-z_]+(?:\{[^}]*\})?", expr)


def test_dashboard_and_alerts_on_a_real_prometheus(tmp_path: Path) -> None:
    _binary("prometheus")
    files = sample_model(90, shard_bytes=64 * 1024)
    src = tmp_path / "src"
    ref = f"file://{write_files(src / 'llama', files)}"
    # Bigger than the whole budget: its warm fails for want of space.
    huge = f"file://{write_files(src / 'huge', sample_model(91, shard_bytes=1024 * 1024))}"
    pods = tmp_path / "pods"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[policy]\nfile_roots = ["{src}"]\n'
        f'[csi]\nkubelet_dir = "{pods}"\n'
        "[store]\nbudget_bytes = 1048576\n"
        "[scrub]\nbytes_per_s = 2097152\nidle_s = 0.2\n"
        "[warm]\nresync_s = 1.0\nretry_failed_s = 1.0\n"
    )
    store = tmp_path / "store"
    endpoint = f"unix://{tmp_path}/csi.sock"
    metrics_port = free_port()
    agent_log = tmp_path / "agent.log"
    target = pods / "pod-1" / "model"
    mounter = SystemMounter()
    with run_fake_kube() as kube:
        kube.put(fake_node(NODE))
        kube.put(deployment("llama", "team-a", annotations={WARM_ANNOTATION: ref}))
        kube.put(deployment("huge", "team-a", annotations={WARM_ANNOTATION: huge}))
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weightcache.app",
                *("--log-format", "json", "node", "--node-name", NODE),
                *("--kubeconfig", str(kube.kubeconfig(tmp_path))),
                *("--store", str(store), "--csi-endpoint", endpoint),
                *("--metrics-address", f"127.0.0.1:{metrics_port}", "--config", str(config)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=agent_log.open("wb"),
        )
        prom: Prometheus | None = None
        try:
            agent_url = f"http://127.0.0.1:{metrics_port}"
            _until("the agent to be ready", lambda: _get(f"{agent_url}/readyz")[0] == 200)
            assert _get(f"{agent_url}/healthz") == (200, b"ok\n")
            prom = _run_prometheus(tmp_path, f"127.0.0.1:{metrics_port}", _write_rules(tmp_path))

            def target_up() -> bool:
                active = prom.api("targets")["activeTargets"]
                return bool(active) and active[0]["health"] == "up"

            _until("prometheus to scrape the agent", target_up)

            def value(expr: str) -> float:
                result = prom.query(expr)
                return float(result[0]["value"][1]) if result else -1.0

            _until(
                "the warm request to be ready",
                lambda: value('weightcache_warm_requests{state="ready"}') == 1,
            )
            _until(
                "the huge model's warm to fail",
                lambda: value('weightcache_warm_requests{state="failed"}') == 1,
            )
            assert asyncio.run(_publish(endpoint, ref, target)) == grpc.StatusCode.OK
            forbidden = asyncio.run(_publish(endpoint, "file:///etc", pods / "pod-2" / "m"))
            assert forbidden == grpc.StatusCode.PERMISSION_DENIED
            _until("a scrub pass", lambda: value("weightcache_scrub_passes_total") >= 1)
            _until("the mount, seen", lambda: value("weightcache_mounts") == 1)
            assert value("weightcache_verify_failures_total") == 0

            # Rot on the disk: one byte of a shard changes under the store.
            (digest,) = (p.name for p in (store / "models").iterdir())
            shard = store / "models" / digest / "model-00001-of-00003.safetensors"
            with shard.open("r+b") as f:
                first = f.read(1)
                f.seek(0)
                f.write(bytes([first[0] ^ 0xFF]))
            _until(
                "the scrubber's finding, seen",
                lambda: value("weightcache_verify_failures_total") >= 1,
            )

            def corruption_firing() -> list[dict[str, Any]]:
                return [
                    a
                    for a in prom.api("alerts")["alerts"]
                    if a["labels"]["alertname"] == "WeightcacheCorruptionFound"
                    and a["state"] == "firing"
                ]

            (alert,) = _until("the corruption alert to fire", corruption_firing)
            assert alert["labels"]["node"] == NODE
            assert alert["labels"]["severity"] == "critical"
            assert NODE in alert["annotations"]["summary"]

            # Every panel query returns data, now and over the last seconds.
            queries = _panel_queries(_dashboard())
            assert len(queries) >= 25
            empty = [(t, q) for t, q in queries if not prom.query(_grafana(q))]
            assert not empty, f"panel queries without data: {empty}"
            for title, expr in queries:
                assert prom.query_range(_grafana(expr), 10), f"{title}: no range data"
            nodes = prom.api("label/node/values", **{"match[]": "weightcache_build_info"})
            assert nodes == [NODE]  # the node variable's values

            # Every alert expression runs, and every series it reads is there.
            alerts = _alerts()
            for rule in alerts:
                prom.query(rule["expr"])
                selectors = _series_selectors(rule["expr"])
                assert selectors, rule["alert"]
                for selector in selectors:
                    assert prom.query(selector), f"{rule['alert']}: no data for {selector}"
            firing = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]}
            assert "WeightcacheCorruptionFound" in firing
            healthy = {
                "WeightcachePublishErrors",
                "WeightcacheScrubStalled",
                "WeightcacheAgentNotReady",
                "WeightcacheScrubBehind",
            }
            assert not firing & healthy, f"false alarms on a working node: {firing & healthy}"

            # The operator's view of the same node.
            shown = run_cli(
                "status",
                "--store",
                str(store),
                "--config",
                str(config),
                "--json",
                "--agent-address",
                f"127.0.0.1:{metrics_port}",
            )
            status = json.loads(shown.stdout)
            assert status["agent"]["node"] == NODE and status["agent"]["ready"] is True
            assert status["agent"]["warm"]["requests"]["ready"] == 1
            assert status["agent"]["scrub"]["failures"] >= 1
            assert any(digest in e.get("digest", "") for e in status["agent"]["recent_errors"])
            assert status["store"]["pins_by_kind"]["mount"] == 1
            assert status["store"]["scrub"]["recent_failures"]
        finally:
            if prom is not None:
                _stop(prom.proc)
            _stop(agent, timeout=60)
            mounter.unmount(target)
    assert agent.returncode == 0, agent_log.read_text()[-3000:]

    # One JSON object per line; every line about the damaged model names it.
    lines = agent_log.read_text().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    model_digest = f"sha256:{digest}"
    about = [r for r in records if model_digest in r["message"] or digest in r["message"]]
    assert about, "no log line about the damaged model"
    for record in about:
        assert record.get("digest") == model_digest, record
        assert record.get("ref") == ref, record
    finding = [r for r in records if r["level"] == "WARNING" and "scrub" in r["logger"]]
    assert finding and all(r.get("digest") == model_digest for r in finding), finding


def test_readyz_follows_the_agents_readiness_and_metrics_carry_it() -> None:
    ready = [False]
    metrics = Metrics()
    server = metrics.serve("127.0.0.1:0", ready=lambda: ready[0])
    try:
        url = f"http://127.0.0.1:{server.port}"
        assert _get(f"{url}/readyz") == (503, b"not ready\n")
        assert _get(f"{url}/healthz") == (200, b"ok\n")
        assert b"weightcache_ready 0.0" in _get(f"{url}/metrics")[1]
        ready[0] = True
        assert _get(f"{url}/readyz") == (200, b"ready\n")
        status, body = _get(f"{url}/metrics")
        assert status == 200 and b"weightcache_ready 1.0" in body
        assert b"process_resident_memory_bytes" in body
        assert _get(f"{url}/status")[0] == 404  # no agent view given
    finally:
        server.close()
