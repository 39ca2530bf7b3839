"""GitOps: Argo CD's health check for ZeroCopyModel, run in a real Lua interpreter on statuses the operator writes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import lupa
import pytest
import yaml

from zerocopy_operator.manifests import parse_spec
from zerocopy_operator.status import invalid_status, observed_status

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "deploy" / "argocd" / "zerocopymodel-health.yaml"
KEY = "resource.customizations.health.zerocopy.dev_ZeroCopyModel"
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
    """Runs the check as Argo CD does: the script is a function body with the object bound to `obj`."""
    script = yaml.safe_load(PATCH.read_text())["data"][KEY]
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
    assert merged[KEY] == yaml.safe_load(PATCH.read_text())["data"][KEY]
