"""The status a ZeroCopyModel shows, from what KubeRay and the replicas report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.replica_info import replica_info
from zerocopy_operator.resources import parse_spec
from zerocopy_operator.status import observed_status, weights_from_info

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
URL = "http://tiny-mlp-serve-svc.models.svc:8000/tiny-mlp"


def _resource() -> dict[str, Any]:
    resource = yaml.safe_load((ROOT / "examples" / "tiny-mlp.yaml").read_text())
    resource["metadata"].update(namespace="models", generation=3)
    return resource


def _rayservice(ready: bool, app: str, deployment: str = "HEALTHY", message: str = "") -> dict[str, Any]:
    return {
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False", "message": "cluster starting"},
                {"type": "UpgradeInProgress", "status": "False"},
            ],
            "activeServiceStatus": {
                "applicationStatuses": {
                    "tiny-mlp": {
                        "status": app,
                        "message": message,
                        "serveDeploymentStatuses": {"ZeroCopyDeployment": {"status": deployment, "message": message}},
                    }
                }
            },
        }
    }


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_no_rayservice_yet_is_pending() -> None:
    resource = _resource()
    status = observed_status(resource, parse_spec(resource), None, None, URL, "t0")
    assert status["phase"] == "Pending"
    assert status["conditions"][0]["type"] == "Ready"
    assert _conditions(status)["Ready"] == ("False", "RayServiceMissing")


def test_serving_rayservice_makes_the_model_ready_with_its_endpoint_and_weights() -> None:
    resource = _resource()
    info = replica_info(weights="tiny-mlp-ab", revision="ab", bytes_shared=2**20, tensor_count=8, shared=True)
    status = observed_status(
        resource, parse_spec(resource), _rayservice(True, "RUNNING"), weights_from_info(info), URL, "t1"
    )
    assert status["phase"] == "Ready"
    assert _conditions(status) == {
        "Ready": ("True", "Serving"),
        "ClusterReady": ("True", "ClusterReady"),
        "WeightsPublished": ("True", "Published"),
        "ServeReady": ("True", "Running"),
    }
    assert status["endpoint"] == URL
    assert (status["replicas"], status["observedGeneration"]) == ("2/2", 3)
    assert "1.0 MiB in 8 tensors" in status["conditions"][2]["message"]


def test_failed_deployment_says_why() -> None:
    resource = _resource()
    rayservice = _rayservice(True, "DEPLOY_FAILED", "UNHEALTHY", "Checksum mismatch for /models/m: fix model.sha256")
    status = observed_status(resource, parse_spec(resource), rayservice, None, URL, "t1")
    assert status["phase"] == "Failed"
    assert _conditions(status)["Ready"] == ("False", "ServeFailed")
    assert "fix model.sha256" in status["conditions"][0]["message"]
    assert status["replicas"] == "0/2"


def test_transition_time_moves_only_when_a_condition_changes() -> None:
    resource = _resource()
    spec = parse_spec(resource)
    first = observed_status(resource, spec, _rayservice(False, "DEPLOYING", "UPDATING"), None, URL, "t1")
    resource["status"] = first
    second = observed_status(resource, spec, _rayservice(True, "RUNNING"), None, URL, "t2")
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Ready"] == "t2"  # False -> True
    assert times["WeightsPublished"] == "t1"  # Unknown both times


def test_text_tasks_show_the_task_and_the_openai_base_url() -> None:
    from zerocopy_operator.api import ZeroCopyModelSpec
    from zerocopy_operator.status import observed_status

    resource = {"metadata": {"name": "chat", "namespace": "ml", "generation": 1}}
    url = "http://chat-serve-svc.ml.svc:8000/chat"
    for task, base in (("text-generation", f"{url}/v1"), ("tensor", None)):
        spec = ZeroCopyModelSpec.model_validate(
            {"model": {"uri": "/m", "architecture": {"transformers": "LlamaForCausalLM"}}, "serving": {"task": task}}
        )
        status = observed_status(resource, spec, None, None, url, "2026-01-01T00:00:00Z")
        assert (status["task"], status["openaiBaseUrl"]) == (task, None)  # no endpoint before the RayService
        status = observed_status(resource, spec, {"status": {}}, None, url, "2026-01-01T00:00:00Z")
        assert (status["task"], status["openaiBaseUrl"]) == (task, base)


def test_adapters_a_model_could_not_serve_are_a_condition_naming_each_and_why() -> None:
    from zerocopy_operator.status import with_adapters

    resource = yaml.safe_load((ROOT / "examples" / "smollm2-chat.yaml").read_text())
    resource["metadata"].update(name="tiny-mlp", namespace="models", generation=2)  # the app _rayservice reports
    resource["spec"]["adapters"] = [{"name": "sql", "uri": "file://sql"}, {"name": "gone", "uri": "s3://b/gone"}]
    spec = parse_spec(resource)
    served = observed_status(resource, spec, _rayservice(True, "RUNNING"), None, URL, "t0")
    broken = replica_info(adapter_errors={"gone": "adapter gone (s3://b/gone) is not served: NoSuchKey"})
    status = with_adapters(served, resource, spec, broken, "t1")
    assert _conditions(status)["AdaptersReady"] == ("False", "AdapterFailed")
    assert status["conditions"][-1]["message"] == "adapter gone (s3://b/gone) is not served: NoSuchKey"
    assert _conditions(status)["Ready"] == ("True", "Serving")  # the model serves its other names meanwhile
    fixed = with_adapters(served, {**resource, "status": status}, spec, replica_info(), "t2")
    assert _conditions(fixed)["AdaptersReady"] == ("True", "Serving")
    assert fixed["conditions"][-1]["lastTransitionTime"] == "t2"
    plain = parse_spec({**resource, "spec": {**resource["spec"], "adapters": []}})
    assert with_adapters(served, resource, plain, broken, "t1") == served  # no adapters listed: no condition
