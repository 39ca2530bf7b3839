"""GitOps: Argo CD's health checks for ZeroCopyModel and ZeroCopyCluster, run in a real Lua interpreter on statuses
the operator writes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml

from zerocopy_operator.clusters import CLUSTER_INVALID, CLUSTER_NOT_FOUND
from zerocopy_operator.resources import parse_cluster_spec, parse_spec, serve_url
from zerocopy_operator.status import OPERATOR_ERROR, cluster_status, invalid_status, observed_status, waiting_status

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "deploy" / "argocd" / "zerocopymodel-health.yaml"
KEYS = {kind: f"resource.customizations.health.zerocopy.dev_{kind}" for kind in ("ZeroCopyModel", "ZeroCopyCluster")}
URL = "http://tiny-mlp-serve-svc.models.svc:8000/tiny-mlp"


def _resource(generation: int = 3) -> dict[str, Any]:
    resource = yaml.safe_load((ROOT / "examples" / "tiny-mlp.yaml").read_text())
    resource["metadata"].update(namespace="models", generation=generation)
    return dict(resource)


def _rayservice(app: str, upgrading: bool = False) -> dict[str, Any]:
    conditions = [
        {"type": "Ready", "status": "True"},
        {"type": "UpgradeInProgress", "status": "True" if upgrading else "False"},
    ]
    statuses = {"tiny-mlp": {"status": app, "serveDeploymentStatuses": {"ZeroCopyDeployment": {"status": "HEALTHY"}}}}
    return {"status": {"conditions": conditions, "activeServiceStatus": {"applicationStatuses": statuses}}}


def health(resource: dict[str, Any]) -> dict[str, str]:
    """Runs the check for the resource's kind as Argo CD does: a function body with the object bound to `obj`."""
    script = yaml.safe_load(PATCH.read_text())["data"][KEYS[resource["kind"]]]
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval(f"function(obj)\n{script}\nend")
    result = check(lua.table_from(resource, recursive=True))
    return {"status": result["status"], "message": result["message"]}


def _observed(app: str | None, upgrading: bool = False) -> dict[str, Any]:
    resource = _resource()
    rayservice = None if app is None else _rayservice(app, upgrading)
    resource["status"] = observed_status(resource, parse_spec(resource), rayservice, None, URL, "t1")
    return resource


def test_serving_model_is_healthy() -> None:
    assert health(_observed("RUNNING")) == {"status": "Healthy", "message": f"serving at {URL}"}


@pytest.mark.parametrize(
    ("resource", "expected"),
    [
        (_resource(), "Progressing"),  # no status yet
        (_observed(None), "Progressing"),  # RayService being created
        (_observed("DEPLOYING"), "Progressing"),
        (_observed("RUNNING", upgrading=True), "Progressing"),
        (_observed("DEPLOY_FAILED"), "Degraded"),
    ],
    ids=["new", "pending", "deploying", "upgrading", "deploy-failed"],
)
def test_health_follows_the_ready_condition_and_phase(resource: dict[str, Any], expected: str) -> None:
    assert health(resource)["status"] == expected


def test_refused_spec_is_degraded_with_the_operators_message() -> None:
    resource = _resource()
    resource["status"] = invalid_status("serving.gpusPerReplica 2 exceeds every worker group", 3, [], "t1")
    assert health(resource) == {"status": "Degraded", "message": "serving.gpusPerReplica 2 exceeds every worker group"}


def test_an_operator_error_is_degraded_since_it_is_not_retried_until_the_spec_changes() -> None:
    resource = _resource()
    resource["status"] = invalid_status("the operator failed on this spec", 3, [], "t1", reason=OPERATOR_ERROR)
    assert health(resource) == {"status": "Degraded", "message": "the operator failed on this spec"}


def test_a_spec_the_operator_has_not_seen_is_progressing_even_if_the_old_one_served() -> None:
    resource = _observed("RUNNING")
    resource["metadata"]["generation"] = 4
    assert health(resource) == {"status": "Progressing", "message": "the operator has not handled generation 4 yet"}


def test_the_patch_merges_into_argocds_config_map_with_kubectl(tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "argocd-cm", "namespace": "argocd"}}
    config_map["data"] = {"url": "https://argocd.example"}
    (tmp_path / "cm.yaml").write_text(yaml.safe_dump(config_map))
    command = ["kubectl", "patch", "--local", "-f", str(tmp_path / "cm.yaml"), "--type", "merge"]
    done = subprocess.run([*command, "--patch-file", str(PATCH), "-o", "yaml"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(done.stdout)["data"]
    assert merged["url"] == "https://argocd.example"
    for key in KEYS.values():
        assert merged[key] == yaml.safe_load(PATCH.read_text())["data"][key]


# ZeroCopyCluster, and the models that name one (examples/shared-cluster.yaml).
SHARED = ROOT / "examples" / "shared-cluster.yaml"


def _shared(kind: str, name: str | None = None, generation: int = 2) -> dict[str, Any]:
    (resource,) = [
        doc
        for doc in yaml.safe_load_all(SHARED.read_text())
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    resource["metadata"].update(namespace="models", generation=generation)
    return dict(resource)


def _cluster_rayservice(apps: dict[str, str], ready: bool = True, upgrading: bool = False) -> dict[str, Any]:
    conditions = [
        {"type": "Ready", "status": "True" if ready else "False", "message": "" if ready else "pods pending"},
        {"type": "UpgradeInProgress", "status": "True" if upgrading else "False"},
    ]
    statuses = {name: {"status": status} for name, status in apps.items()}
    return {"status": {"conditions": conditions, "activeServiceStatus": {"applicationStatuses": statuses}}}


def _entry(name: str, ready: bool) -> dict[str, Any]:
    application = "RUNNING" if ready else "DEPLOYING"
    return {"name": name, "route": f"/{name}", "application": application, "ready": ready, "message": ""}


def _observed_cluster(rayservice: dict[str, Any] | None, models: list[dict[str, Any]]) -> dict[str, Any]:
    resource = _shared("ZeroCopyCluster")
    spec = parse_cluster_spec(resource)
    resource["status"] = cluster_status(resource, spec, rayservice, models, [], serve_url("models", "shared"), "t1")
    return resource


def test_the_shared_body_checks_both_kinds_alike() -> None:
    data = yaml.safe_load(PATCH.read_text())["data"]
    assert set(data) == set(KEYS.values())
    assert data[KEYS["ZeroCopyCluster"]] == data[KEYS["ZeroCopyModel"]]
    assert "*health" in PATCH.read_text()  # one body in the file, not two copies that may drift


def test_a_ready_cluster_is_healthy_with_its_models_summary() -> None:
    models = [_entry("chat", True), _entry("minilm", True)]
    resource = _observed_cluster(_cluster_rayservice({"chat": "RUNNING", "minilm": "RUNNING"}), models)
    assert health(resource) == {"status": "Healthy", "message": "2 of 2 models serving"}


@pytest.mark.parametrize(
    ("rayservice", "models", "expected"),
    [
        (None, [], "Progressing"),  # RayService being created
        (_cluster_rayservice({}, ready=False), [_entry("chat", False)], "Progressing"),  # pods starting
        (_cluster_rayservice({"chat": "RUNNING"}, upgrading=True), [_entry("chat", True)], "Progressing"),
        # The cluster itself is up: a model that is not serving yet is that model's own health.
        (_cluster_rayservice({"chat": "DEPLOYING"}), [_entry("chat", False)], "Healthy"),
    ],
    ids=["pending", "starting", "upgrading", "model-deploying"],
)
def test_cluster_health_follows_its_ready_condition_and_phase(
    rayservice: dict[str, Any] | None, models: list[dict[str, Any]], expected: str
) -> None:
    assert health(_observed_cluster(rayservice, models))["status"] == expected


def test_an_upgrading_cluster_says_the_previous_revision_serves() -> None:
    resource = _observed_cluster(_cluster_rayservice({"chat": "RUNNING"}, upgrading=True), [_entry("chat", True)])
    assert resource["status"]["phase"] == "Upgrading"
    assert health(resource) == {"status": "Progressing", "message": "upgrading; the previous revision keeps serving"}


@pytest.mark.parametrize("reason", ["InvalidSpec", OPERATOR_ERROR])
def test_a_refused_cluster_is_degraded_with_the_operators_message(reason: str) -> None:
    resource = _shared("ZeroCopyCluster")
    resource["status"] = invalid_status("spec.workerGroups[0].gpus: must be >= 0", 2, [], "t1", reason=reason)
    assert health(resource) == {"status": "Degraded", "message": "spec.workerGroups[0].gpus: must be >= 0"}


def test_a_cluster_spec_the_operator_has_not_seen_is_progressing_even_if_the_old_one_was_ready() -> None:
    resource = _observed_cluster(_cluster_rayservice({"chat": "RUNNING"}), [_entry("chat", True)])
    resource["metadata"]["generation"] = 3
    assert health(resource) == {"status": "Progressing", "message": "the operator has not handled generation 3 yet"}
    del resource["status"]
    assert health(resource) == {"status": "Progressing", "message": "waiting for the zerocopy operator"}


def test_a_model_waiting_for_its_missing_cluster_is_progressing_with_the_operators_message() -> None:
    resource = _shared("ZeroCopyModel", "chat")
    message = "ZeroCopyCluster shared does not exist in namespace models: create it"
    resource["status"] = waiting_status(resource, CLUSTER_NOT_FOUND, message, "t1")
    assert health(resource) == {"status": "Progressing", "message": message}


def test_a_model_on_an_invalid_cluster_is_degraded_since_only_fixing_the_cluster_helps() -> None:
    resource = _shared("ZeroCopyModel", "minilm")
    message = "ZeroCopyCluster shared is invalid (spec.head.cpu: bad); the model is served once the cluster is fixed"
    resource["status"] = waiting_status(resource, CLUSTER_INVALID, message, "t1")
    assert health(resource) == {"status": "Degraded", "message": message}


def test_a_model_served_on_a_shared_cluster_is_healthy() -> None:
    resource = _shared("ZeroCopyModel", "chat")
    url = serve_url("models", "shared") + "/chat"
    rayservice = _cluster_rayservice({"chat": "RUNNING"})
    resource["status"] = observed_status(resource, parse_spec(resource), rayservice, None, url, "t1")
    assert health(resource) == {"status": "Healthy", "message": f"serving at {url}"}
