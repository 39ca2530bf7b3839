"""A ZeroCopyCluster and its models: one RayService, one Serve application per model, checks across models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.kube import kuberay
from tests.kube.clusters import Cluster, Refused
from zerocopy_operator.clusters import current_applications, model_entry, store_use
from zerocopy_operator.manifests import build_cluster_rayservice
from zerocopy_operator.placement import plan_cluster
from zerocopy_operator.resources import endpoint, parse_cluster_spec, parse_spec
from zerocopy_operator.status import cluster_status, observed_status
from zerocopy_operator.validation import InvalidSpec, validate, validate_cluster
from zerocopy_runtime.contract import ROUTER_APP

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example/zerocopy-runtime:test"
MiB = 2**20


def _documents() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The shared-cluster example: its ZeroCopyCluster and its models, in namespace `models`, oldest first."""
    documents = list(yaml.safe_load_all((ROOT / "examples" / "shared-cluster.yaml").read_text()))
    for age, document in enumerate(documents):
        document["metadata"].update(namespace="models", uid=f"uid-{age}", creationTimestamp=f"2026-01-0{age + 1}")
    return documents[0], documents[1:]


def _rayservice(cluster: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
    plan = plan_cluster(cluster["metadata"]["name"], parse_cluster_spec(cluster), models, {})
    assert not [m.problems for m in plan.members if m.problems]
    return build_cluster_rayservice(cluster, plan.applications, IMAGE)


def _applications(rayservice: dict[str, Any]) -> dict[str, Any]:
    applications = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    return {app["name"]: app for app in applications if app["name"] != ROUTER_APP}  # the models' only


def _problems(cluster: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, list[str]]:
    plan = plan_cluster(cluster["metadata"]["name"], parse_cluster_spec(cluster), models, {})
    return {m.name: m.problems for m in plan.members}


def test_one_rayservice_holds_one_application_per_model_and_kuberay_takes_it() -> None:
    cluster, models = _documents()
    rayservice = _rayservice(cluster, models)
    assert rayservice["metadata"]["name"] == "shared"
    assert rayservice["metadata"]["labels"]["zerocopy.dev/cluster"] == "shared"
    apps = _applications(rayservice)
    assert list(apps) == ["chat", "minilm"]
    assert {name: app["route_prefix"] for name, app in apps.items()} == {"chat": "/chat", "minilm": "/minilm"}
    assert apps["minilm"]["args"]["task"] == "embeddings"
    assert apps["chat"]["deployments"][0]["ray_actor_options"]["num_gpus"] == 0.25
    worker = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["rayStartParams"]["object-store-memory"] == str(2 * 2**30)
    assert worker["template"]["metadata"]["labels"]["zerocopy.dev/cluster"] == "shared"
    if reason := kuberay.missing():
        pytest.skip(reason)
    crd = yaml.safe_load(kuberay.crd("rayservices").read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(schema).validate(rayservice)


def test_a_change_to_one_model_changes_only_its_application() -> None:
    cluster, models = _documents()
    before = _rayservice(cluster, models)
    edited = copy.deepcopy(models)
    edited[0]["spec"]["serving"]["replicas"] = 3
    after = _rayservice(cluster, edited)
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]  # no new Ray cluster
    old, new = _applications(before), _applications(after)
    assert new["minilm"] == old["minilm"]
    assert new["chat"]["deployments"][0]["num_replicas"] == 3 != old["chat"]["deployments"][0]["num_replicas"]
    # The same models in another order render the same serveConfigV2: no spurious redeploy.
    assert _rayservice(cluster, list(reversed(models)))["spec"]["serveConfigV2"] == before["spec"]["serveConfigV2"]


def test_a_model_endpoint_is_its_route_on_the_clusters_serve_service() -> None:
    _, models = _documents()
    assert endpoint(models[0], parse_spec(models[0])) == "http://shared-serve-svc.models.svc:8000/chat"


@pytest.mark.kube
def test_a_model_with_a_cluster_ref_takes_no_cluster_of_its_own_on_both_sides(
    kube_cluster: Cluster, kube_namespace: str
) -> None:
    _, models = _documents()
    model = copy.deepcopy(models[1])
    model["metadata"] = {"name": model["metadata"]["name"], "namespace": kube_namespace}  # as written, no uid
    resource = copy.deepcopy(model)
    resource["spec"]["cluster"] = {"head": {"cpu": "1"}}
    with pytest.raises(InvalidSpec, match=r"spec\.clusterRef takes the cluster and its upgrade strategy"):
        validate(resource)
    with pytest.raises(Refused, match=r"spec: Invalid value: .*spec\.clusterRef takes the cluster") as refused:
        kube_cluster.dry_run_create(resource, kube_namespace)
    assert refused.value.status == 422
    kube_cluster.dry_run_create(model, kube_namespace)  # the example itself is taken


def test_the_newer_model_is_refused_when_the_weights_together_overflow_a_worker_store() -> None:
    cluster, models = _documents()
    cluster["spec"]["workerGroups"][0]["objectStoreMemory"] = "600Mi"  # chat's 520Mi fits, minilm's 87Mi more does not
    problems = _problems(cluster, models)
    assert problems["chat"] == []
    (message,) = problems["minilm"]
    assert "would not fit worker group gpu of ZeroCopyCluster shared" in message
    assert "the models already there (chat) take 520Mi" in message
    assert "87Mi would make 607Mi" in message
    assert "raise objectStoreMemory of worker group gpu" in message


def test_a_model_whose_replicas_cannot_land_on_a_group_does_not_count_against_its_store() -> None:
    cluster, models = _documents()
    cluster["spec"]["workerGroups"] = [
        {"name": "gpu", "gpus": 1, "objectStoreMemory": "600Mi"},
        {"name": "cpu", "gpus": 0, "objectStoreMemory": "600Mi"},
    ]
    minilm = copy.deepcopy(models[1])
    minilm["spec"]["serving"]["gpusPerReplica"] = 0  # may land on either group; chat only on gpu
    plan = plan_cluster("shared", parse_cluster_spec(cluster), [models[0], minilm], {})
    assert plan.members[0].problems == []
    (message,) = plan.members[1].problems  # the gpu group is full once chat is there; the cpu group has room
    assert "worker group gpu" in message
    chat_only = copy.deepcopy(models[0])
    chat_only["spec"]["serving"]["gpusPerReplica"] = 0.25
    uses = {u.group: u for u in plan_cluster("shared", parse_cluster_spec(cluster), [chat_only], {}).store}
    assert (uses["gpu"].weights_bytes, uses["cpu"].weights_bytes) == (520 * MiB, 0)


def test_routes_are_unique_and_replicas_must_fit_the_clusters_pods() -> None:
    cluster, models = _documents()
    clash = copy.deepcopy(models)
    clash[1]["spec"]["serving"]["routePrefix"] = "/chat"
    assert "route prefix /chat is already used by ZeroCopyModel chat" in _problems(cluster, clash)["minilm"][0]
    greedy = copy.deepcopy(models)
    greedy[1]["spec"]["serving"]["gpusPerReplica"] = 2
    (message,) = _problems(cluster, greedy)["minilm"]
    assert message.startswith("serving.gpusPerReplica is 2 but no worker group of ZeroCopyCluster shared")


def test_a_credentials_secret_must_be_one_the_clusters_pods_carry() -> None:
    cluster, models = _documents()
    models[1]["spec"]["model"]["credentialsSecret"] = {"name": "s3-keys"}
    assert "not among ZeroCopyCluster shared's credentialsSecrets" in _problems(cluster, models)["minilm"][0]
    cluster["spec"]["credentialsSecrets"] = [{"name": "s3-keys"}]
    assert _problems(cluster, models)["minilm"] == []
    worker = _rayservice(cluster, models)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "s3-keys"}}]


def test_a_refused_edit_keeps_the_application_the_model_had() -> None:
    cluster, models = _documents()
    served = _rayservice(cluster, models)
    owned = copy.deepcopy(served)
    owned["metadata"]["ownerReferences"] = [{"uid": cluster["metadata"]["uid"]}]
    current = current_applications(cluster, owned)
    assert current_applications(cluster, served) == {}  # a RayService the cluster does not own is not its state
    models[1]["spec"]["model"]["size"] = "4Gi"
    plan = plan_cluster("shared", parse_cluster_spec(cluster), models, current)
    refused = plan.members[1]
    assert refused.problems
    assert refused.application == current["minilm"]
    assert plan.applications == [current["chat"], current["minilm"]]
    assert plan_cluster("shared", parse_cluster_spec(cluster), models, {}).applications == [current["chat"]]


def test_models_of_other_clusters_and_models_being_deleted_are_not_placed() -> None:
    cluster, models = _documents()
    models[0]["spec"]["clusterRef"]["name"] = "other"
    models[1]["metadata"]["deletionTimestamp"] = "2026-01-09T00:00:00Z"
    assert _problems(cluster, models) == {}
    assert _applications(_rayservice(cluster, models)) == {}


def test_a_bad_cluster_spec_is_refused_with_each_problem() -> None:
    cluster, _ = _documents()
    cluster["metadata"]["name"] = "9" + "x" * 50
    cluster["spec"]["workerGroups"][0]["objectStoreMemory"] = "1Mi"
    with pytest.raises(InvalidSpec) as refused:
        validate_cluster(cluster)
    assert len(refused.value.problems) == 2
    assert "more than 47: KubeRay refuses longer RayService names (the cluster's RayService" in str(refused.value)
    assert "objectStoreMemory '1Mi' is below Ray's minimum" in str(refused.value)


def test_each_model_reads_its_own_application_and_the_cluster_counts_them() -> None:
    cluster, models = _documents()
    plan = plan_cluster("shared", parse_cluster_spec(cluster), models, {})
    rayservice = {
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "activeServiceStatus": {
                "applicationStatuses": {
                    "chat": {
                        "status": "RUNNING",
                        "serveDeploymentStatuses": {"ZeroCopyDeployment": {"status": "HEALTHY"}},
                    },
                    "minilm": {"status": "DEPLOYING", "message": "minilm starting"},
                }
            },
        }
    }
    statuses = {}
    for member in plan.members:
        assert member.spec is not None
        url = endpoint(member.resource, member.spec)
        statuses[member.name] = observed_status(member.resource, member.spec, rayservice, None, url, "t0")
    ready = {name: status["conditions"][0]["status"] for name, status in statuses.items()}
    assert ready == {"chat": "True", "minilm": "False"}
    assert statuses["chat"]["rayService"] == statuses["chat"]["cluster"] == "shared"
    assert statuses["chat"]["replicas"] == "2/2"
    entries = [model_entry(m, statuses[m.name], rayservice) for m in plan.members]
    status = cluster_status(cluster, parse_cluster_spec(cluster), rayservice, entries, store_use(plan), "u", "t0")
    assert (status["phase"], status["modelsReady"], status["conditions"][0]["status"]) == ("Ready", "1/2", "True")
    assert [(e["name"], e["application"], e["ready"]) for e in status["models"]] == [
        ("chat", "RUNNING", True), ("minilm", "DEPLOYING", False),
    ]  # fmt: skip
    assert status["objectStore"] == [
        {"group": "gpu", "capacityBytes": 2 * 2**30, "weightsBytes": 607 * MiB, "models": ["chat", "minilm"]}
    ]
    assert status["objectStoreSummary"] == "gpu 607Mi/2Gi"


def _served(cluster: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The applications the cluster's RayService serves for `models`, as `current_applications` reads them."""
    owned = _rayservice(cluster, models)
    owned["metadata"]["ownerReferences"] = [{"uid": cluster["metadata"]["uid"]}]
    return current_applications(cluster, owned)


def test_an_edit_that_grows_a_model_is_refused_not_the_unchanged_model_beside_it() -> None:
    cluster, models = _documents()
    current = _served(cluster, models)
    grown = copy.deepcopy(models)
    # chat, the older, moves to bigger weights: with minilm's 87Mi more than the 2Gi store
    grown[0]["spec"]["model"].update(uri="file://.cache/smollm2-1.7b", size="1980Mi")
    grown[0]["status"] = {"weights": {"bytes": 513 * MiB}}  # what its replicas reported of the weights they serve
    plan = plan_cluster("shared", parse_cluster_spec(cluster), grown, current)
    chat, minilm = plan.members
    assert minilm.problems == []
    assert "would not fit worker group gpu" in chat.problems[0]
    assert chat.application == current["chat"]  # its previous application keeps serving
    assert plan.store[0].weights_bytes <= plan.store[0].capacity_bytes


def test_a_route_a_kept_application_still_serves_is_not_given_to_another_model() -> None:
    cluster, models = _documents()
    current = _served(cluster, models)
    edited = copy.deepcopy(models)
    edited[0]["spec"]["serving"]["routePrefix"] = "/x"
    edited[0]["spec"]["model"]["size"] = "4Gi"  # refused: chat keeps serving /chat
    edited[1]["spec"]["serving"]["routePrefix"] = "/chat"
    plan = plan_cluster("shared", parse_cluster_spec(cluster), edited, current)
    assert "route prefix /chat is served now by ZeroCopyModel chat's application" in plan.members[1].problems[0]
    routes = [app["route_prefix"] for app in plan.applications]
    assert sorted(routes) == ["/chat", "/minilm"]  # both previous applications, no duplicate route


def test_a_replica_needing_gpus_of_one_group_and_cpus_of_another_is_refused() -> None:
    cluster, models = _documents()
    cluster["spec"]["workerGroups"] = [
        {"name": "gpu", "gpus": 1, "cpu": "1", "objectStoreMemory": "2Gi"},
        {"name": "cpu", "gpus": 0, "cpu": "8", "objectStoreMemory": "2Gi"},
    ]
    models[1]["spec"]["serving"].update(gpusPerReplica=1, cpusPerReplica=4)
    (message,) = _problems(cluster, models)["minilm"]
    assert message.startswith("no worker group of ZeroCopyCluster shared has both 1 GPUs and 4 CPUs per pod")


def test_the_cli_refuses_two_resources_that_would_be_one() -> None:
    from zerocopy_operator.cli import UserError, check_names

    cluster, models = _documents()
    check_names([(Path("a.yaml"), d) for d in [cluster, *models]])
    twice = [(Path("a.yaml"), models[0]), (Path("b.yaml"), copy.deepcopy(models[0]))]
    with pytest.raises(UserError, match=r"ZeroCopyModel/chat in namespace models appears twice \(a\.yaml"):
        check_names(twice)
    own = copy.deepcopy(models[0])
    own["metadata"]["name"] = "shared"
    del own["spec"]["clusterRef"]
    with pytest.raises(UserError, match="would both make RayService shared"):
        check_names([(Path("a.yaml"), cluster), (Path("b.yaml"), own)])
