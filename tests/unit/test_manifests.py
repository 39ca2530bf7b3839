"""Pure builders: each rendered RayService is valid for KubeRay and says what the model asks for."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.kube import kuberay
from zerocopy_operator import quantity
from zerocopy_operator.manifests import build_app_args, build_rayservice
from zerocopy_operator.resources import endpoint, parse_spec
from zerocopy_operator.validation import InvalidSpec, validate

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = kuberay.crd("rayservices")
IMAGE = "registry.example/zerocopy-runtime:test"


def _example(name: str = "tiny-mlp.yaml") -> dict[str, Any]:
    resource = yaml.safe_load((ROOT / "examples" / name).read_text())
    resource["metadata"]["namespace"] = "models"
    return resource


def _serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return config


@pytest.fixture(scope="module")
def kuberay_schema() -> dict[str, Any]:
    if reason := kuberay.missing():
        pytest.skip(reason)
    crd = yaml.safe_load(KUBERAY.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return dict(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("name", ["tiny-mlp.yaml", "gpt2-gpu.yaml"])
def test_rendered_rayservice_validates_against_kuberays_crd(name: str, kuberay_schema: dict[str, Any]) -> None:
    rayservice = build_rayservice(_example(name), IMAGE)
    jsonschema.Draft4Validator(kuberay_schema).validate(rayservice)


def test_incremental_upgrade_validates_against_kuberays_crd(kuberay_schema: dict[str, Any]) -> None:
    resource = _example("gpt2-gpu.yaml")
    resource["spec"]["upgradeStrategy"] = {
        "type": "NewClusterWithIncrementalUpgrade",
        "incremental": {"gatewayClassName": "istio", "stepSizePercent": 25, "intervalSeconds": 30},
    }
    rayservice = build_rayservice(resource, IMAGE)
    jsonschema.Draft4Validator(kuberay_schema).validate(rayservice)
    assert rayservice["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["stepSizePercent"] == 25


def test_serve_config_runs_the_runtime_with_the_same_args_as_zerocopy_serve() -> None:
    resource = _example()
    app = _serve_config(build_rayservice(resource, IMAGE))["applications"][0]
    assert app["import_path"] == "zerocopy_runtime.serve:build_app"
    assert app["route_prefix"] == "/tiny-mlp"
    args = build_app_args("tiny-mlp", parse_spec(resource))
    assert app["args"] == args.model_dump(mode="json", exclude_none=True)
    deployment = app["deployments"][0]
    assert deployment["num_replicas"] == 2
    assert deployment["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}


def test_autoscaling_and_fractional_gpus_reach_serve() -> None:
    deployment = _serve_config(build_rayservice(_example("gpt2-gpu.yaml"), IMAGE))["applications"][0]["deployments"][0]
    assert "num_replicas" not in deployment
    assert deployment["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 4, "target_ongoing_requests": 4}
    assert deployment["ray_actor_options"]["num_gpus"] == 0.5


def test_head_runs_no_replicas_and_workers_carry_gpus_and_tolerations() -> None:
    cluster = build_rayservice(_example("gpt2-gpu.yaml"), IMAGE)["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker = cluster["workerGroupSpecs"][0]
    pod = worker["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert worker["rayStartParams"]["num-gpus"] == "1"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["image"] == IMAGE
    assert cluster["enableInTreeAutoscaling"] is True


def test_object_store_is_explicit_and_shm_and_memory_cover_it() -> None:
    worker = build_rayservice(_example(), IMAGE)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    store = int(worker["rayStartParams"]["object-store-memory"])
    assert store == 512 * 2**20
    pod = worker["template"]["spec"]
    shm = quantity.to_bytes(pod["volumes"][0]["emptyDir"]["sizeLimit"])
    assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
    assert shm > store
    requested = quantity.to_bytes(pod["containers"][0]["resources"]["requests"]["memory"])
    assert requested == 2 * 2**30 + shm  # the processes' 2Gi plus the memory-backed /dev/shm
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]


def test_model_changes_touch_only_the_serve_config_and_cluster_changes_only_the_cluster() -> None:
    before = _example()
    model_change = copy.deepcopy(before)
    model_change["spec"]["serving"]["replicas"] = 3
    model_change["spec"]["model"]["uri"] = "s3://bucket/tiny-mlp-v2.safetensors"
    cluster_change = copy.deepcopy(before)
    cluster_change["spec"]["cluster"]["workerGroups"][0]["memory"] = "4Gi"
    base, by_model, by_cluster = (build_rayservice(r, IMAGE)["spec"] for r in (before, model_change, cluster_change))
    assert by_model["rayClusterConfig"] == base["rayClusterConfig"]
    assert by_model["serveConfigV2"] != base["serveConfigV2"]
    assert by_cluster["serveConfigV2"] == base["serveConfigV2"]
    assert by_cluster["rayClusterConfig"] != base["rayClusterConfig"]


def test_credentials_come_from_a_secret_reference() -> None:
    resource = _example()
    resource["spec"]["model"]["credentialsSecret"] = {"name": "s3-creds"}
    cluster = build_rayservice(resource, IMAGE)["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        assert pod["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]


def test_endpoint_is_the_serve_service_of_the_rayservice() -> None:
    resource = _example()
    assert endpoint(resource, parse_spec(resource)) == "http://tiny-mlp-serve-svc.models.svc:8000/tiny-mlp"


def test_more_gpus_per_replica_than_any_worker_has_is_refused() -> None:
    resource = _example("gpt2-gpu.yaml")
    resource["spec"]["serving"]["gpusPerReplica"] = 2
    with pytest.raises(InvalidSpec, match=r"gpusPerReplica is 2 but no worker group has more than 1 GPUs"):
        validate(resource)


def test_object_store_smaller_than_the_model_is_refused_with_both_sizes() -> None:
    resource = _example()
    resource["spec"]["model"]["size"] = "1Gi"
    with pytest.raises(InvalidSpec, match=r"take 1Gi but the largest worker object store is 512Mi"):
        validate(resource)
    resource["spec"]["model"].pop("size")
    with pytest.raises(InvalidSpec, match="take 2Gi"):
        validate(resource, known_bytes=2 * 2**30)  # the size the runtime reported last time
    resource["spec"]["model"]["size"] = "100Mi"  # the file's size, while the replicas published a float32 cast
    with pytest.raises(InvalidSpec, match="take 2Gi"):
        validate(resource, known_bytes=2 * 2**30)
    assert validate(resource, known_bytes=50 * 2**20) is not None  # 100Mi, the larger, fits


def test_route_prefix_collision_refuses_the_newer_model_only() -> None:
    older, newer = _example(), _example()
    older["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    newer["metadata"].update(name="tiny-mlp-2", creationTimestamp="2026-01-02T00:00:00Z")
    with pytest.raises(InvalidSpec, match="route prefix /tiny-mlp is already used by ZeroCopyModel tiny-mlp"):
        validate(newer, [older, newer])
    assert validate(older, [older, newer]).serving.route_prefix == "/tiny-mlp"


def test_adapters_go_to_user_config_not_args_so_that_a_change_is_in_place() -> None:
    from zerocopy_operator.manifests import build_router_application

    resource = _example("smollm2-chat.yaml")
    plain = _serve_config(build_rayservice(copy.deepcopy(resource), IMAGE))["applications"][0]
    assert plain["deployments"][0]["user_config"] == {"adapters": []}  # there, so removing the last one reaches
    resource["spec"]["adapters"] = [{"name": "sql", "uri": "file://adapters/sql"}]
    app = _serve_config(build_rayservice(resource, IMAGE))["applications"][0]
    assert app["deployments"][0]["user_config"] == {"adapters": [{"name": "sql", "uri": "file://adapters/sql"}]}
    assert app["args"] == plain["args"]  # the args (a change of which restarts replicas) are the same
    router = build_router_application([app])
    assert router is not None
    assert router["args"]["models"][0]["adapters"] == ["sql"]
