"""A ZeroCopyCluster's reconciliation (`zerocopy_operator.clusters`) driving the in-memory FakeKube.

tests/unit/test_clusters.py checks the pure planning (placement, routes, store use); these tests check what
the plan makes the operator do: which RayService it applies, which statuses it writes, and when it writes none.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.unit.fake_kube import NAMESPACE, FakeKube, closed_port, kuberay_status, shared_cluster
from zerocopy_operator import clusters as cl
from zerocopy_operator import reconcile as rc
from zerocopy_operator.manifests import CLUSTER_LABEL, build_cluster_rayservice
from zerocopy_runtime.contract import ROUTER_APP, RoutedModel, RouterArgs

pytestmark = pytest.mark.unit


SETTINGS = rc.Settings(default_image="runtime:test", info_url=f"http://127.0.0.1:{closed_port()}{{route}}/-/info")
MiB = 2**20


@pytest.fixture
def kube() -> FakeKube:
    """Namespace `models` holding examples/shared-cluster.yaml: cluster `shared`, models `chat` and `minilm`."""
    fake = FakeKube()
    fake.add(*shared_cluster())
    return fake


def _cluster(kube: FakeKube) -> dict[str, Any]:
    return copy.deepcopy(kube.clusters[(NAMESPACE, "shared")])


def _applications(kube: FakeKube, name: str = "shared") -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(kube.rayservices[(NAMESPACE, name)]["spec"]["serveConfigV2"])
    return {app["name"]: app for app in config["applications"] or [] if app["name"] != ROUTER_APP}  # models only


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def _edit_model(kube: FakeKube, name: str, **serving: Any) -> None:
    """A `kubectl apply` of an edited serving section: the spec's generation moves."""
    stored = kube.models[(NAMESPACE, name)]
    stored["spec"]["serving"].update(serving)
    stored["metadata"]["generation"] += 1


def _serve(kube: FakeKube) -> None:
    """KubeRay reports the cluster up and every application of the cluster's RayService RUNNING."""
    kube.set_rayservice_status(NAMESPACE, "shared", kuberay_status(dict.fromkeys(_applications(kube), "RUNNING")))


def test_models_that_name_the_cluster_join_its_one_rayservice(kube: FakeKube) -> None:
    outcome = cl.reconcile_cluster(kube, _cluster(kube), SETTINGS)
    assert outcome.action == "created"
    assert list(kube.rayservices) == [(NAMESPACE, "shared")]  # no RayService of their own
    rayservice = kube.rayservices[(NAMESPACE, "shared")]
    assert (
        rayservice["metadata"]["ownerReferences"][0]["uid"] == kube.clusters[(NAMESPACE, "shared")]["metadata"]["uid"]
    )
    assert rayservice["metadata"]["labels"][CLUSTER_LABEL] == "shared"
    assert {n: a["route_prefix"] for n, a in _applications(kube).items()} == {"chat": "/chat", "minilm": "/minilm"}
    assert set(outcome.models) == {"chat", "minilm"}
    assert {s["phase"] for s in outcome.models.values()} == {"Provisioning"}
    assert outcome.models["chat"]["endpoint"] == f"http://shared-serve-svc.{NAMESPACE}.svc:8000/chat"
    assert outcome.status["modelsReady"] == "0/2"
    # One OpenAI endpoint in front of both: the router application, last, at /.
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    router = config["applications"][-1]
    assert (router["name"], router["route_prefix"], router["import_path"]) == (
        ROUTER_APP, "/", "zerocopy_runtime.router:build_router",
    )  # fmt: skip
    assert RouterArgs.model_validate(router["args"]).models == [
        RoutedModel(name="chat", application="chat", task="text-generation"),
        RoutedModel(name="minilm", application="minilm", task="embeddings"),
    ]
    assert router["deployments"][0]["ray_actor_options"] == {"num_cpus": 0}
    assert outcome.status["openaiBaseUrl"] == f"http://shared-serve-svc.{NAMESPACE}.svc:8000/v1"

    _serve(kube)
    kube.forget_calls()
    served = cl.reconcile_cluster(kube, _cluster(kube), SETTINGS)
    assert served.action == "unchanged"
    assert [c.method for c in kube.writes()] == []  # reconcile_cluster applies; the statuses are `write`'s
    assert kube.called("get_rayservice") == [(NAMESPACE, "shared")]  # unchanged: what it read is what it observes
    assert (served.status["phase"], served.status["modelsReady"]) == ("Ready", "2/2")
    assert {s["phase"] for s in served.models.values()} == {"Ready"}
    entries = {m["name"]: m for m in served.status["models"]}
    assert entries["chat"] == {
        "name": "chat", "route": "/chat", "application": "RUNNING", "ready": True, "weightsBytes": 520 * MiB,
        "message": f"serving at http://shared-serve-svc.{NAMESPACE}.svc:8000/chat",
    }  # fmt: skip


def test_a_refused_model_is_left_out_while_the_other_keeps_serving(kube: FakeKube) -> None:
    _edit_model(kube, "minilm", gpusPerReplica=2)  # before it was ever served: no application to keep
    outcome = cl.reconcile_cluster(kube, _cluster(kube), SETTINGS)
    assert list(_applications(kube)) == ["chat"]
    minilm = outcome.models["minilm"]
    assert (minilm["phase"], _ready(minilm)["reason"], minilm["observedGeneration"]) == ("Failed", "InvalidSpec", 2)
    assert "serving.gpusPerReplica is 2 but no worker group of ZeroCopyCluster shared" in _ready(minilm)["message"]
    assert "keeps serving" not in _ready(minilm)["message"]
    assert minilm["endpoint"] is None
    assert minilm["weights"] is None
    assert outcome.models["chat"]["phase"] == "Provisioning"
    entries = {m["name"]: m for m in outcome.status["models"]}
    assert (entries["minilm"]["application"], entries["minilm"]["route"]) == ("Refused", None)
    assert "refused: minilm" in next(c for c in outcome.status["conditions"] if c["type"] == "ModelsReady")["message"]


def test_a_refused_edit_keeps_the_previous_application_serving(kube: FakeKube) -> None:
    cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    _serve(kube)
    weights = {"name": "minilm-1", "revision": "1", "bytes": 87 * MiB, "tensors": 101, "shared": True}
    kube.models[(NAMESPACE, "minilm")]["status"]["weights"] = weights  # as its replicas reported them
    cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    before = _applications(kube)
    served_status = kube.models[(NAMESPACE, "minilm")]["status"]
    assert (served_status["phase"], served_status["weights"]) == ("Ready", weights)

    _edit_model(kube, "minilm", gpusPerReplica=2)
    kube.forget_calls()
    outcome = cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    assert outcome is not None
    assert outcome.action == "unchanged"
    assert kube.called("replace_rayservice") == []
    assert _applications(kube) == before  # the previous minilm application still runs
    status = kube.models[(NAMESPACE, "minilm")]["status"]
    assert (status["phase"], _ready(status)["reason"]) == ("Failed", "InvalidSpec")
    assert _ready(status)["message"].endswith("; its previous spec keeps serving until this is fixed")
    assert status["endpoint"] == served_status["endpoint"]  # still served there: not cleared
    assert status["weights"] == weights
    assert kube.called("patch_model_status") == [(NAMESPACE, "minilm", outcome.models["minilm"])]  # chat unchanged

    _edit_model(kube, "minilm", gpusPerReplica=0.5)  # fixed: the new spec replaces the previous application
    assert cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS) is not None
    assert _applications(kube)["minilm"]["deployments"][0]["ray_actor_options"]["num_gpus"] == 0.5


def test_a_model_whose_spec_does_not_parse_still_names_its_cluster(kube: FakeKube) -> None:
    """Refused before it has a spec at all (a type error), it keeps status.cluster: it still names the cluster."""
    _edit_model(kube, "minilm", replicas="many")
    outcome = cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    assert outcome is not None
    status = kube.models[(NAMESPACE, "minilm")]["status"]
    assert (status["phase"], _ready(status)["reason"], status["cluster"]) == ("Failed", "InvalidSpec", "shared")
    assert "replicas" in _ready(status)["message"]


def test_a_deleted_models_application_goes_with_the_next_reconciliation(kube: FakeKube) -> None:
    cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    del kube.models[(NAMESPACE, "minilm")]
    kube.forget_calls()
    outcome = cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    assert outcome is not None
    assert outcome.action == "updated"
    assert list(_applications(kube)) == ["chat"]
    assert [m["name"] for m in kube.clusters[(NAMESPACE, "shared")]["status"]["models"]] == ["chat"]
    assert all(call[1] != "minilm" for call in kube.called("patch_model_status"))  # it is gone: no 404


def test_without_its_cluster_every_model_waits_with_cluster_not_found(kube: FakeKube) -> None:
    del kube.clusters[(NAMESPACE, "shared")]
    assert cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS) is None
    assert kube.rayservices == {}
    for name in ("chat", "minilm"):
        status = kube.models[(NAMESPACE, name)]["status"]
        assert (status["phase"], status["cluster"], _ready(status)["reason"]) == (
            "Pending",
            "shared",
            "ClusterNotFound",
        )
        assert "ZeroCopyCluster shared does not exist in namespace models" in _ready(status)["message"]
        assert "endpoint" not in status  # a merge patch's null removes it
    kube.forget_calls()
    assert cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS) is None
    assert kube.writes() == []  # still waiting, for the same reason: nothing to write


def test_a_cluster_being_deleted_counts_as_missing_and_its_serving_models_are_told(kube: FakeKube) -> None:
    cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    _serve(kube)
    cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    assert kube.models[(NAMESPACE, "chat")]["status"]["endpoint"]
    kube.clusters[(NAMESPACE, "shared")]["metadata"]["deletionTimestamp"] = "2026-02-01T00:00:00Z"
    kube.forget_calls()
    assert cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS) is None
    assert kube.called("replace_rayservice") == []
    assert kube.called("patch_cluster_status") == []
    status = kube.models[(NAMESPACE, "chat")]["status"]
    assert (status["phase"], _ready(status)["reason"]) == ("Pending", "ClusterNotFound")
    assert "endpoint" not in status
    assert "weights" not in status
    assert status["readyReplicas"] == 0


def test_an_invalid_cluster_leaves_its_models_waiting_with_cluster_invalid(kube: FakeKube) -> None:
    kube.clusters[(NAMESPACE, "shared")]["spec"]["workerGroups"][0]["gpus"] = -1
    assert cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS) is None
    assert kube.rayservices == {}
    assert kube.called("patch_cluster_status") == []  # the cluster's own handler reports its problems
    status = kube.models[(NAMESPACE, "minilm")]["status"]
    assert (status["phase"], _ready(status)["reason"]) == ("Pending", "ClusterInvalid")
    assert "ZeroCopyCluster shared is invalid (spec.workerGroups[0].gpus:" in _ready(status)["message"]
    with pytest.raises(cl.InvalidSpec):
        cl.reconcile_cluster(kube, _cluster(kube), SETTINGS)


def test_only_changed_statuses_are_written(kube: FakeKube, monkeypatch: pytest.MonkeyPatch) -> None:
    first = cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    assert first is not None
    assert sorted(c[1] for c in kube.called("patch_model_status")) == ["chat", "minilm"]
    assert kube.called("patch_cluster_status") == [(NAMESPACE, "shared", first.status)]
    assert kube.clusters[(NAMESPACE, "shared")]["status"]["modelsReady"] == "0/2"

    # Later (another second on the clock, so each condition would be stamped anew): nothing changed, nothing written.
    later = "2099-01-01T00:00:00Z"
    monkeypatch.setattr(cl, "now", lambda: later)
    monkeypatch.setattr(rc, "now", lambda: later)
    kube.forget_calls()
    again = cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    assert again is not None
    assert again.action == "unchanged"
    assert kube.writes() == []

    _serve(kube)  # KubeRay's progress: every status changes
    kube.forget_calls()
    cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    assert sorted(c[1] for c in kube.called("patch_model_status")) == ["chat", "minilm"]
    assert len(kube.called("patch_cluster_status")) == 1
    assert kube.called("replace_rayservice") == []
    assert kube.called("create_rayservice") == []
    ready = _ready(kube.models[(NAMESPACE, "chat")]["status"])
    assert (ready["status"], ready["lastTransitionTime"]) == ("True", later)


def test_holding_names_the_clusters_whose_status_lists_the_model(kube: FakeKube) -> None:
    assert cl.holding(kube, NAMESPACE, "chat") == []  # not reconciled yet: no status lists it
    cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    other, _, _ = shared_cluster()
    other["metadata"]["name"] = "other"
    kube.add_cluster(other)
    assert cl.holding(kube, NAMESPACE, "chat") == ["shared"]
    assert cl.holding(kube, NAMESPACE, "nobody") == []
    assert cl.holding(kube, "elsewhere", "chat") == []


def test_changed_ignores_transition_times_and_treats_null_as_absent() -> None:
    condition = {"type": "Ready", "status": "True", "reason": "Serving", "message": ""}
    old = {"phase": "Ready", "conditions": [{**condition, "lastTransitionTime": "2026-01-01T00:00:00Z"}], "x": 1}
    assert not rc.changed(old, {"phase": "Ready", "conditions": [{**condition, "lastTransitionTime": "later"}]})
    assert not rc.changed(old, {"endpoint": None})  # already absent
    assert rc.changed(old, {"x": None})  # would remove x
    assert rc.changed(old, {"conditions": [{**condition, "status": "False"}]})
    assert not rc.changed(old, {})


def test_a_cluster_rayservice_owned_by_something_else_is_not_ours(kube: FakeKube) -> None:
    cluster = _cluster(kube)
    theirs = build_cluster_rayservice(cluster, [], "someone/else:1")
    kube.add_rayservice(theirs)  # no owner reference
    assert cl.current_applications(cluster, kube.get_rayservice(NAMESPACE, "shared")) == {}
    kube.forget_calls()
    with pytest.raises(rc.NotOurs, match="not owned by this ZeroCopyCluster"):
        cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    assert kube.writes() == []


class _RacingKube(FakeKube):
    """KubeRay writes the RayService's status between the operator's read of it and its replace, once."""

    race = False

    def list_models(self, namespace: str) -> list[dict[str, Any]]:
        if self.race:  # reconcile_cluster lists the models just after it read the RayService
            self.race = False
            self.set_rayservice_status(namespace, "shared", kuberay_status({"chat": "RUNNING"}))
        return super().list_models(namespace)


def test_a_change_to_the_rayservice_during_a_reconciliation_fails_it_with_409() -> None:
    """The RayService is read before the models are listed: a change in between fails the replace, not lost."""
    kube = _RacingKube()
    kube.add(*shared_cluster())
    cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    _edit_model(kube, "chat", replicas=3)
    kube.race = True
    with pytest.raises(ApiException) as conflict:
        cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS)
    assert conflict.value.status == 409
    assert "num_replicas: 3" not in kube.rayservices[(NAMESPACE, "shared")]["spec"]["serveConfigV2"]
    assert cl.sync_cluster(kube, NAMESPACE, "shared", SETTINGS) is not None  # the retry reads again and succeeds
    assert "num_replicas: 3" in kube.rayservices[(NAMESPACE, "shared")]["spec"]["serveConfigV2"]
    assert kube.rayservices[(NAMESPACE, "shared")]["status"]["conditions"][0]["status"] == "True"  # kept


def test_a_cluster_of_tensor_models_has_no_openai_router(kube: FakeKube) -> None:
    for name in ("chat", "minilm"):
        _edit_model(kube, name, task="tensor", handler="tensor")
    outcome = cl.reconcile_cluster(kube, _cluster(kube), SETTINGS)
    config = yaml.safe_load(kube.rayservices[(NAMESPACE, "shared")]["spec"]["serveConfigV2"])
    assert [app["name"] for app in config["applications"]] == ["chat", "minilm"]
    assert outcome.status["openaiBaseUrl"] is None


@pytest.mark.parametrize("route", ["/", "/v1", "/v1/chat"])
def test_a_model_may_not_take_the_clusters_openai_routes(kube: FakeKube, route: str) -> None:
    _edit_model(kube, "minilm", routePrefix=route)
    outcome = cl.reconcile_cluster(kube, _cluster(kube), SETTINGS)
    assert list(_applications(kube)) == ["chat"]
    message = _ready(outcome.models["minilm"])["message"]
    assert f"route prefix {route} is the OpenAI endpoint of ZeroCopyCluster shared" in message
