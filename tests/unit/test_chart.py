"""The Helm chart: lints strictly, renders valid Kubernetes objects for each way people install it, and stays
in step with the operator (CRD copy, settings, labels and ports the operator's pods carry)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart import CHART, by_kind, grants, render, run_helm
from zerocopy_operator.cli import DEFAULT_RUNTIME_IMAGE
from zerocopy_operator.crd import RESOURCES
from zerocopy_operator.manifests import build_rayservice

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
#: Every CRD `zerocopy crd --out crds` generates; the chart installs a copy of each.
CRDS = [resource.file_name for resource in RESOURCES]
#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas we have.
KUBE_VERSIONS = ["1.27.0", "1.37.0"]

VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}"],
    "monitored": ["--set", "metrics.podMonitor.enabled=true", "--set", "metrics.podMonitor.labels.release=prom"],
    "own-account": [
        "--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops", "--set", "rbac.create=false",
    ],
    "tuned": [
        "--set", "verbose=true", "--set", "logFormat=plain", "--set", "healthPort=9090",
        "--set", "imagePullSecrets[0].name=registry", "--set", "image.tag=dev", "--set", "runtimeImage=reg/rt:1",
        "--set", "tolerations[0].key=dedicated", "--set", "tolerations[0].operator=Exists",
        "--set", "nodeSelector.pool=system", "--set", "priorityClassName=system-cluster-critical",
    ],
}  # fmt: skip


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(objects, "Deployment")
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(operator)


def env(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects)["env"] if "value" in e}


def test_the_chart_holds_every_generated_crd_and_nothing_else() -> None:
    assert sorted(CRDS) == ["zerocopyclusters.zerocopy.dev.yaml", "zerocopymodels.zerocopy.dev.yaml"]
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(CRDS)
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(CRDS)


@pytest.mark.parametrize("crd", CRDS)
def test_chart_crd_is_an_exact_copy_of_the_generated_one(crd: str) -> None:
    copy, generated = CHART / "crds" / crd, ROOT / "crds" / crd
    assert copy.read_bytes() == generated.read_bytes(), (
        f"{copy} drifted from {generated}; regenerate both: zerocopy crd --out crds && cp crds/*.yaml {copy.parent}/"
    )


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints_strictly(name: str) -> None:
    done = run_helm("lint", "--strict", str(CHART), *VALUE_SETS[name])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_builtin_objects_validate_strictly(name: str, version: str) -> None:
    objects = render(*VALUE_SETS[name])
    builtin = [o for o in objects if o["kind"] != "PodMonitor"]
    assert builtin, "the chart rendered nothing"
    for obj in builtin:
        kubernetes_validate.validate(obj, version, strict=True)


def test_cluster_wide_install_binds_a_cluster_role_to_the_operators_account() -> None:
    objects = render()
    (role,) = by_kind(objects, "ClusterRole")
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    assert role["metadata"]["name"] == "zerocopy-system-zc-zerocopy-operator"  # two releases named zc may coexist
    (account,) = by_kind(objects, "ServiceAccount")
    (deployment,) = by_kind(objects, "Deployment")
    assert not by_kind(objects, "Role")
    assert not by_kind(objects, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "zerocopy-system"}
    ]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert env(objects)["ZEROCOPY_NAMESPACES"] == ""


def test_namespaced_install_grants_roles_in_each_watched_namespace_and_nothing_cluster_wide() -> None:
    objects = render(*VALUE_SETS["namespaced"])
    assert not by_kind(objects, "ClusterRole")
    assert not by_kind(objects, "ClusterRoleBinding")
    roles, bindings = by_kind(objects, "Role"), by_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "zerocopy-system"
    assert env(objects)["ZEROCOPY_NAMESPACES"] == "team-a,team-b"


def test_rbac_is_the_same_either_way_with_no_wildcards_and_nothing_beyond_its_resources() -> None:
    """Which requests the operator really makes is checked against these rules in tests/integration/test_operator.py."""
    (role,) = by_kind(render(), "ClusterRole")
    allowed = grants(role["rules"])
    assert not any("*" in grant for grant in allowed)
    assert {resource for _, resource, _ in allowed} == {
        "events", "rayservices",
        "zerocopymodels", "zerocopymodels/status", "zerocopymodels/finalizers",
        "zerocopyclusters", "zerocopyclusters/status", "zerocopyclusters/finalizers",
    }  # fmt: skip
    # The operator never creates or deletes its own kinds, and only patches their status.
    assert not {verb for group, _, verb in allowed if group == "zerocopy.dev"} & {"create", "delete"}
    for kind in ("zerocopymodels", "zerocopyclusters"):
        assert {v for g, r, v in allowed if (g, r) == ("zerocopy.dev", kind)} == {"get", "list", "watch", "patch"}
        assert {v for g, r, v in allowed if (g, r) == ("zerocopy.dev", f"{kind}/status")} == {"patch"}
        # What OwnerReferencesPermissionEnforcement asks of whoever sets a blocking owner reference: a model owns
        # its own RayService, a ZeroCopyCluster the one its models share.
        assert {("ray.io", "rayservices", "delete"), ("zerocopy.dev", f"{kind}/finalizers", "update")} <= allowed
    (namespaced_role, _) = by_kind(render(*VALUE_SETS["namespaced"]), "Role")
    assert grants(namespaced_role["rules"]) == allowed


def test_the_pod_runs_as_the_operator_images_user() -> None:
    (deployment,) = by_kind(render(), "Deployment")
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    stage = dockerfile[dockerfile.index("AS operator") :].split("\nFROM ")[0]
    (user,) = re.findall(r"^USER (\S+)", stage, flags=re.MULTILINE)
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}"


def test_operator_pod_is_locked_down() -> None:
    objects = render()
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    operator = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert operator["securityContext"]["readOnlyRootFilesystem"] is True
    assert operator["securityContext"]["allowPrivilegeEscalation"] is False
    assert operator["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "limits" in operator["resources"]
    assert "requests" in operator["resources"]
    (tmp,) = [m for m in operator["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert any(v["name"] == tmp["name"] and "emptyDir" in v for v in pod["volumes"])
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("name", ["default", "tuned"])
def test_probes_reach_the_liveness_endpoint_the_operator_serves(name: str) -> None:
    objects = render(*VALUE_SETS[name])
    operator = container(objects)
    port = int(re.fullmatch(r"http://0\.0\.0\.0:(\d+)/healthz", env(objects)["ZEROCOPY_LIVENESS"]).group(1))  # type: ignore[union-attr]
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"]["path"] == "/healthz"
        assert ports[operator[probe]["httpGet"]["port"]] == port


def test_values_reach_the_operator() -> None:
    objects = render(*VALUE_SETS["tuned"])
    operator, settings = container(objects), env(objects)
    assert operator["image"] == "ghcr.io/zerocopy-operator/zerocopy-operator:dev"
    assert operator["args"] == ["--verbose"]
    assert settings["ZEROCOPY_RUNTIME_IMAGE"] == "reg/rt:1"
    assert settings["ZEROCOPY_LOG_FORMAT"] == "plain"
    pod = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert "args" not in container(render())


def test_own_account_renders_no_account_and_no_rbac() -> None:
    objects = render(*VALUE_SETS["own-account"])
    assert {o["kind"] for o in objects} == {"Deployment"}
    assert by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_pod_monitor_selects_the_ray_pods_the_operator_renders_by_their_metrics_port() -> None:
    (monitor,) = by_kind(render(*VALUE_SETS["monitored"]), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    resource = yaml.safe_load((ROOT / "examples" / "tiny-mlp.yaml").read_text())
    resource["metadata"]["namespace"] = "models"
    cluster = build_rayservice(resource, "img")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for group in groups:
        labels = group["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (ray,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in ray.get("ports", [])}
        assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"])
    namespaced = by_kind(render(*VALUE_SETS["namespaced"], "--set", "metrics.podMonitor.enabled=true"), "PodMonitor")
    assert namespaced[0]["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "logFormat=xml"], "/logFormat"),
        (["--set", "watchNamespaces=team-a"], "/watchNamespaces"),
        (["--set", "watchNamespaces={Team_A}"], "/watchNamespaces/0"),
        (["--set", "watchNamespace={team-a}"], "watchNamespace"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "healthPort=80"], "/healthPort"),
        (["--set", "serviceAccount.create=false"], "serviceAccount.name is required"),
    ],
)
def test_bad_values_are_refused_naming_the_value(args: list[str], message: str) -> None:
    done = run_helm("template", "zc", str(CHART), *args)
    assert done.returncode != 0
    assert message in done.stderr


def _keys(values: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and value:
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def _schema_keys(schema: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, sub in schema.get("properties", {}).items():
        keys.add(prefix + key)
        keys |= _schema_keys(sub, f"{prefix}{key}.")
    return keys


def test_every_value_is_commented() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = [
        line.strip()
        for number, line in enumerate(lines)
        if re.match(r"^\s*[A-Za-z][\w-]*:", line) and not (number and lines[number - 1].strip().startswith("#"))
    ]
    assert not uncommented, f"values without a comment line above them: {uncommented}"


def test_schema_describes_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    free_form = {"podSecurityContext", "securityContext", "affinity"}  # Kubernetes' own types, passed through
    described = _schema_keys(schema)
    missing = {k for k in _keys(values) if k not in described and k.split(".")[0] not in free_form}
    assert not missing, f"values.yaml keys missing from values.schema.json: {sorted(missing)}"
    extra = {k for k in described if k not in _keys(values) and "." not in k}
    assert not extra, f"values.schema.json names values that values.yaml lacks: {sorted(extra)}"


def test_chart_defaults_match_the_operator_and_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version
    assert values["runtimeImage"] == DEFAULT_RUNTIME_IMAGE
    assert container(render())["image"].endswith(f":{version}")


@pytest.mark.parametrize("crd", CRDS)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_the_charts_crd_validates_strictly(version: str, crd: str) -> None:
    document = yaml.safe_load((CHART / "crds" / crd).read_text())
    kubernetes_validate.validate(document, version, strict=True)
