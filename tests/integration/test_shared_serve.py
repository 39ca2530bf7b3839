"""Several models on one Serve, deployed as KubeRay does: the whole config each time, one application per model."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import ROOT, delete_model
from tests.models import MLP

pytestmark = pytest.mark.integration

NAMES = ("shared-a", "shared-b")


@pytest.fixture
def models(serve_port: int, tmp_path: Path) -> Iterator[dict[str, MLP]]:
    """One MLP checkpoint per model; afterwards both applications deleted and their weights released."""
    found = {}
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        found[name] = MLP(16, 1).eval()
        save_file(found[name].state_dict(), tmp_path / f"{name}.safetensors")
    yield found
    for name in NAMES:
        delete_model(name)


def _application(name: str, folder: Path, **serving: Any) -> dict[str, Any]:
    """The Serve application the operator puts in its ZeroCopyCluster's serveConfigV2 for a model naming it."""
    from zerocopy_operator.manifests import build_cluster_rayservice
    from zerocopy_operator.placement import plan_cluster
    from zerocopy_operator.resources import parse_cluster_spec

    resource = {
        "apiVersion": "zerocopy.dev/v1alpha1",
        "kind": "ZeroCopyModel",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterRef": {"name": "pool"},
            "model": {
                "uri": f"file://{folder / f'{name}.safetensors'}",
                "architecture": {"factory": "tests.models:MLP", "kwargs": {"width": 16, "depth": 1}},
            },
            "serving": {"replicas": 1, "cpusPerReplica": 0.25} | serving,
        },
    }
    cluster = {"metadata": {"name": "pool", "namespace": "default"}, "spec": {}}
    plan = plan_cluster("pool", parse_cluster_spec(cluster), [resource], {})
    rayservice = build_cluster_rayservice(cluster, plan.applications, "runtime:test")
    (application,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return dict(application) | {"runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}}}


def _deploy(applications: list[dict[str, Any]]) -> None:
    """The whole config at once, through Serve's declarative API, as KubeRay applies serveConfigV2."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    client = serve.context._get_global_client()
    assert client is not None
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": applications}))


def _replicas(app: str) -> set[str]:
    """The names of an application's replica actors (Serve's replica ids are in them)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"::{app}#" in a["name"]}


def _post(url: str, x: torch.Tensor) -> list[float]:
    request = urllib.request.Request(
        url, data=json.dumps({"inputs": x.tolist()}).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["outputs"]


def _info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/-/info", timeout=30) as response:
        return json.loads(response.read())


def _answers_correctly(url: str, model: MLP) -> bool:
    x = torch.randn(16)
    with torch.no_grad():
        return torch.allclose(torch.tensor(_post(url, x)), model(x.unsqueeze(0))[0], atol=1e-6)


def _until(condition: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.2)


def _running(*apps: str) -> bool:
    from ray import serve

    statuses = serve.status().applications
    for app in apps:
        status = statuses[app].status if app in statuses else "NOT_STARTED"
        assert status not in ("DEPLOY_FAILED", "UNHEALTHY"), statuses[app]
        if status != "RUNNING":
            return False
    return True


def test_one_model_changes_or_goes_and_the_other_keeps_its_replicas_and_weights(
    models: dict[str, MLP], serve_port: int, tmp_path: Path
) -> None:
    from ray import serve

    from zerocopy_runtime import published_names

    a, b = NAMES
    urls = {name: f"http://127.0.0.1:{serve_port}/{name}" for name in NAMES}
    _deploy([_application(a, tmp_path), _application(b, tmp_path)])
    _until(lambda: _running(a, b), what="both applications running")
    a_before, b_before, b_replicas = _info(urls[a]), _info(urls[b]), _replicas(b)
    assert {a_before["weights"], b_before["weights"]} <= set(published_names())

    # (a) Only the first model changes: its replicas are replaced in place, attached to the same weights.
    _deploy([_application(a, tmp_path, batching={"maxBatchSize": 4}), _application(b, tmp_path)])

    def a_updated() -> bool:
        assert _answers_correctly(urls[b], models[b])  # the other model answers all along
        try:
            return _running(a) and _info(urls[a])["max_batch_size"] == 4
        except urllib.error.HTTPError:  # the old replica draining
            return False

    _until(a_updated, what=f"{a} redeployed with the new batching")
    a_after = _info(urls[a])
    assert a_after["pid"] != a_before["pid"]
    assert a_after["object_ids"] == a_before["object_ids"]  # an in-place update keeps (and reuses) the weights
    assert a_after["owner_pid"] == a_before["owner_pid"]
    assert _answers_correctly(urls[a], models[a])
    assert _replicas(b) == b_replicas
    assert _info(urls[b])["pid"] == b_before["pid"]

    # (b) The first model leaves the config: Serve deletes its application, and its weights go with it.
    _deploy([_application(b, tmp_path)])
    _until(lambda: a not in serve.status().applications, what=f"{a} deleted")
    _until(lambda: not [n for n in published_names() if n.startswith(f"{a}-")], what=f"{a}'s weights released")
    assert b_before["weights"] in published_names()
    assert _replicas(b) == b_replicas
    b_after = _info(urls[b])
    assert (b_after["pid"], b_after["object_ids"]) == (b_before["pid"], b_before["object_ids"])
    assert _answers_correctly(urls[b], models[b])


def test_a_model_deleted_at_zero_replicas_has_its_copy_released_by_the_other_models_replicas(
    models: dict[str, MLP], serve_port: int, tmp_path: Path
) -> None:
    """A model scaled to zero and then deleted has no replica left to release its copy; its owner still records
    the application that used it, and the health checks of another model's replicas release it. A copy no Serve
    replica ever used (published from Python) stays."""
    import ray

    import zerocopy_runtime as zc
    from zerocopy_runtime import find_or_publish, published_names
    from zerocopy_runtime._owner import actor_name
    from zerocopy_runtime.config import AppArgs

    a, b = NAMES
    _deploy([_application(b, tmp_path, healthCheckPeriodS=1)])
    _until(lambda: _running(b), what=f"{b} running")
    # What a model that scaled to zero and was then deleted leaves behind: its copy, whose owner recorded the
    # application and a replica that is gone.
    gone = find_or_publish(AppArgs.model_validate(_application(a, tmp_path)["args"]))
    owner = ray.get_actor(actor_name(gone.name), namespace=gone.namespace)
    ray.get(owner.register.remote(f"SERVE_REPLICA::{a}#Model#gone", "serve", a))
    from_python = zc.publish(tmp_path / f"{a}.safetensors", name="published-from-python")
    try:
        _until(lambda: gone.name not in published_names(), timeout=30, what=f"{a}'s orphaned copy released")
        assert from_python.name in published_names()
        assert _info(f"http://127.0.0.1:{serve_port}/{b}")["weights"] in published_names()
        assert _answers_correctly(f"http://127.0.0.1:{serve_port}/{b}", models[b])
    finally:
        zc.release(from_python)
