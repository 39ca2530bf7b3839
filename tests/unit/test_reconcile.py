"""One reconciliation of a ZeroCopyModel (`zerocopy_operator.reconcile`) against the in-memory FakeKube.

The end-to-end versions of these behaviours run against a Kubernetes API in tests/integration/test_operator.py;
here each branch is driven directly, in milliseconds. The first tests keep the fake faithful to `Kube`.
"""

from __future__ import annotations

import copy
import inspect
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from kubernetes.client.exceptions import ApiException

from tests.replica_info import replica_info
from tests.unit.fake_kube import NAMESPACE, FakeKube, closed_port, kuberay_status, merge_patch, model
from zerocopy_operator import reconcile as rc
from zerocopy_operator.kube import Kube
from zerocopy_operator.manifests import MODEL_LABEL, build_rayservice
from zerocopy_operator.resources import parse_spec
from zerocopy_operator.validation import InvalidSpec

pytestmark = pytest.mark.unit

INFO = replica_info()


UNREACHABLE = rc.Settings(default_image="runtime:test", info_url=f"http://127.0.0.1:{closed_port()}{{route}}/-/info")


class _Info(BaseHTTPRequestHandler):
    """Plays the replicas' GET <route>/-/info, recording the paths asked for."""

    paths: list[str]

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        path = urlsplit(self.path).path
        body = INFO.model_dump_json().encode() if path.endswith("/-/info") else b"not json"
        if path.endswith("/-/old"):  # a replica of another version: JSON, but not the contract
            body = json.dumps({"weights": "m-0123", "bytes": 1}).encode()
        if path.endswith("/-/adapters"):  # a replica that could not read one of its adapters
            body = replica_info(adapter_errors={"gone": "adapter gone (file://gone) is not served: no such file"})
            body = body.model_dump_json().encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def info() -> Iterator[tuple[rc.Settings, list[str]]]:
    """Settings whose info_url reaches a /-/info server on loopback, and the paths it was asked for."""
    asked: list[str] = []
    handler = type("Info", (_Info,), {"paths": asked})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}{{route}}/-/info?name={{name}}&namespace={{namespace}}"
    yield rc.Settings(default_image="runtime:test", info_url=url), asked
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


# The fake stays faithful to the interface it stands in for.


def test_fake_kube_overrides_every_public_method_of_kube_with_the_same_signature() -> None:
    public = [name for name, member in inspect.getmembers(Kube, inspect.isfunction) if not name.startswith("_")]
    assert "replace_rayservice" in public
    assert len(public) >= 12
    for name in public:
        assert name in vars(FakeKube), f"FakeKube does not implement Kube.{name}: it would reach a real client"
        assert inspect.signature(getattr(FakeKube, name)) == inspect.signature(getattr(Kube, name)), name


def test_fake_kube_behaves_as_the_api_server_where_the_operator_relies_on_it(kube: FakeKube) -> None:
    assert kube.get_rayservice(NAMESPACE, "nothing") is None  # 404 -> None
    kube.delete_rayservice(NAMESPACE, "nothing")  # gone already is fine
    body = build_rayservice(model("alpha"), "runtime:test")
    kube.create_rayservice(NAMESPACE, body)
    with pytest.raises(ApiException) as exists:
        kube.create_rayservice(NAMESPACE, body)
    assert exists.value.status == 409
    stored = kube.get_rayservice(NAMESPACE, "alpha")
    assert stored is not None
    meta = stored["metadata"]
    assert (meta["namespace"], meta["generation"]) == (NAMESPACE, 1)
    assert meta["uid"]
    assert meta["resourceVersion"]
    stored["spec"]["rayClusterConfig"]["rayVersion"] = "mutated"  # answers are copies
    assert kube.rayservices[(NAMESPACE, "alpha")]["spec"]["rayClusterConfig"]["rayVersion"] != "mutated"

    kube.set_rayservice_status(NAMESPACE, "alpha", {"serviceStatus": "Running"})  # a newer resourceVersion
    with pytest.raises(ApiException) as stale:
        kube.replace_rayservice(NAMESPACE, stored)
    assert stale.value.status == 409
    fresh = kube.get_rayservice(NAMESPACE, "alpha")
    assert fresh is not None
    fresh["spec"]["rayClusterConfig"]["rayVersion"] = "2.0.0"
    fresh["status"] = {"ignored": True}
    kube.replace_rayservice(NAMESPACE, fresh)
    replaced = kube.rayservices[(NAMESPACE, "alpha")]
    assert replaced["metadata"]["generation"] == 2
    assert replaced["metadata"]["uid"] == meta["uid"]
    assert replaced["status"] == {"serviceStatus": "Running"}  # the status subresource is not written by a PUT
    del fresh["metadata"]["resourceVersion"]
    with pytest.raises(ApiException, match="must be specified"):
        kube.replace_rayservice(NAMESPACE, fresh)

    kube.add_model(model("alpha"))
    kube.patch_model_status(NAMESPACE, "alpha", {"phase": "Ready", "weights": {"bytes": 1}, "conditions": [{"a": 1}]})
    kube.patch_model_status(NAMESPACE, "alpha", {"weights": None, "conditions": [{"b": 2}]})
    assert kube.models[(NAMESPACE, "alpha")]["status"] == {"phase": "Ready", "conditions": [{"b": 2}]}
    with pytest.raises(ApiException) as missing:
        kube.patch_model_status(NAMESPACE, "gone", {"phase": "Ready"})
    assert missing.value.status == 404

    kube.fail("list_models", api_error := ApiException(status=503), times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as failed:
            kube.list_models(NAMESPACE)
        assert failed.value is api_error
    assert [m["metadata"]["name"] for m in kube.list_models(NAMESPACE)] == ["alpha"]
    assert [c.method for c in kube.writes()].count("patch_model_status") == 3  # the failed 404 one too
    with pytest.raises(AttributeError):
        kube.fail("list_modles")


def test_merge_patch_removes_nulls_recursively_and_replaces_lists() -> None:
    target = {"a": {"b": 1, "c": 2}, "l": [1, 2], "k": 1}
    assert merge_patch(target, {"a": {"b": None, "d": {"e": None}}, "l": [3], "k": None}) == {
        "a": {"c": 2, "d": {}},
        "l": [3],
    }
    assert target == {"a": {"b": 1, "c": 2}, "l": [1, 2], "k": 1}


# check


def test_check_refuses_a_route_an_older_model_of_the_namespace_has(kube: FakeKube) -> None:
    older = kube.add_model(model("older", created="2026-01-01T00:00:00Z", routePrefix="/shared"))
    newer = kube.add_model(model("newer", created="2026-01-02T00:00:00Z", routePrefix="/shared"))
    kube.add_model({**model("elsewhere", routePrefix="/shared"), "metadata": {"name": "elsewhere", "namespace": "x"}})
    assert rc.check(kube, older).serving.route_prefix == "/shared"  # the older one keeps its route
    with pytest.raises(InvalidSpec, match="route prefix /shared is already used by ZeroCopyModel older"):
        rc.check(kube, newer)
    assert kube.called("list_models") == [(NAMESPACE,), (NAMESPACE,)]


def test_an_older_models_new_route_counts_from_its_new_generation(kube: FakeKube) -> None:
    """Routes are read once per generation of a spec (not in every reconcile of every other model): an edit
    that moves the older model away frees its route at once."""
    older = kube.add_model(model("older", created="2026-01-01T00:00:00Z", routePrefix="/shared"))
    newer = kube.add_model(model("newer", created="2026-01-02T00:00:00Z", routePrefix="/shared"))
    with pytest.raises(InvalidSpec, match="route prefix /shared is already used by ZeroCopyModel older"):
        rc.check(kube, newer)
    moved = copy.deepcopy(older)
    moved["spec"]["serving"]["routePrefix"] = "/elsewhere"
    moved["metadata"]["generation"] += 1  # what the API server does on a spec change
    kube.models[(NAMESPACE, "older")] = moved
    assert rc.check(kube, newer).serving.route_prefix == "/shared"


def test_check_counts_the_weights_the_replicas_reported_when_the_spec_gives_no_size(kube: FakeKube) -> None:
    resource = model("alpha")
    del resource["spec"]["model"]["size"]
    assert rc.check(kube, kube.add_model(resource)) is not None
    resource["status"] = {"weights": {"bytes": 4 * 2**30}}  # more than the 512Mi worker object store
    with pytest.raises(InvalidSpec, match="object store"):
        rc.check(kube, resource)


# apply


def test_apply_creates_an_owned_rayservice_then_leaves_it_alone(kube: FakeKube) -> None:
    resource = kube.add_model(model("alpha"))
    action, body = rc.apply(kube, resource, UNREACHABLE)
    assert action == "created"
    stored = kube.rayservices[(NAMESPACE, "alpha")]
    assert stored["metadata"]["labels"][MODEL_LABEL] == "alpha"
    assert stored["spec"] == body["spec"]
    (owner,) = stored["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ZeroCopyModel", "alpha", resource["metadata"]["uid"], True,
    )  # fmt: skip

    # What the API server and KubeRay add (defaults, a status, annotations) is not drift: nothing is written.
    stored["spec"]["serviceUnhealthySecondThreshold"] = 900
    stored["metadata"]["annotations"] = {"ray.io/last-applied": "x"}
    kube.set_rayservice_status(NAMESPACE, "alpha", kuberay_status({"alpha": "RUNNING"}))
    kube.forget_calls()
    action, current = rc.apply(kube, resource, UNREACHABLE)
    assert action == "unchanged"
    assert current["status"]["activeServiceStatus"]["applicationStatuses"]["alpha"]["status"] == "RUNNING"
    assert kube.writes() == []


def test_apply_puts_back_drifted_fields_and_keeps_what_others_added_to_metadata(kube: FakeKube) -> None:
    resource = kube.add_model(model("alpha"))
    rc.apply(kube, resource, UNREACHABLE)
    stored = kube.rayservices[(NAMESPACE, "alpha")]
    original = copy.deepcopy(stored["spec"])
    stored["spec"]["rayClusterConfig"]["rayVersion"] = "2.0.0"  # an edit by hand
    stored["metadata"]["labels"]["team"] = "search"
    stored["metadata"]["annotations"] = {"note": "kept"}
    stored["metadata"]["finalizers"] = ["example.com/keep"]
    kube.set_rayservice_status(NAMESPACE, "alpha", kuberay_status({"alpha": "RUNNING"}))
    version = kube.rayservices[(NAMESPACE, "alpha")]["metadata"]["resourceVersion"]

    action, _ = rc.apply(kube, resource, UNREACHABLE)
    assert action == "updated"
    (put,) = kube.called("replace_rayservice")
    assert put[1]["metadata"]["resourceVersion"] == version  # optimistic: a concurrent change would fail
    after = kube.rayservices[(NAMESPACE, "alpha")]
    assert after["spec"] == original
    assert after["metadata"]["labels"]["team"] == "search"
    assert after["metadata"]["labels"][MODEL_LABEL] == "alpha"
    assert after["metadata"]["annotations"] == {"note": "kept"}
    assert after["metadata"]["finalizers"] == ["example.com/keep"]
    assert after["metadata"]["uid"] == stored["metadata"]["uid"]  # updated in place, not re-created
    assert after["status"]["conditions"][0]["type"] == "Ready"


def test_apply_changes_the_serve_config_of_an_edited_model(kube: FakeKube) -> None:
    resource = kube.add_model(model("alpha", replicas=1))
    rc.apply(kube, resource, UNREACHABLE)
    before = copy.deepcopy(kube.rayservices[(NAMESPACE, "alpha")])
    edited = copy.deepcopy(resource)
    edited["spec"]["serving"]["replicas"] = 3
    assert rc.apply(kube, edited, UNREACHABLE)[0] == "updated"
    after = kube.rayservices[(NAMESPACE, "alpha")]
    assert "num_replicas: 3" in after["spec"]["serveConfigV2"]
    assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]


def test_a_rayservice_owned_by_something_else_is_not_touched(kube: FakeKube) -> None:
    resource = kube.add_model(model("alpha"))
    theirs = build_rayservice(model("alpha"), "someone/else:1")
    theirs["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "other"}]
    kube.add_rayservice(theirs)
    kube.forget_calls()
    with pytest.raises(rc.NotOurs, match="RayService alpha already exists and is not owned by this ZeroCopyModel"):
        rc.apply(kube, resource, UNREACHABLE)
    assert kube.writes() == []
    kube.rayservices[(NAMESPACE, "alpha")]["metadata"]["ownerReferences"] = []  # nobody's: not ours either
    with pytest.raises(rc.NotOurs):
        rc.apply(kube, resource, UNREACHABLE)


def test_a_change_between_reading_and_replacing_fails_with_409_instead_of_being_lost(kube: FakeKube) -> None:
    resource = kube.add_model(model("alpha"))
    rc.apply(kube, resource, UNREACHABLE)
    kube.rayservices[(NAMESPACE, "alpha")]["spec"]["rayClusterConfig"]["rayVersion"] = "2.0.0"
    current = kube.get_rayservice(NAMESPACE, "alpha")  # read, then KubeRay writes before the replace
    kube.set_rayservice_status(NAMESPACE, "alpha", kuberay_status({"alpha": "RUNNING"}))
    with pytest.raises(ApiException) as conflict:
        rc.apply_desired(kube, resource, rc.desired_rayservice(resource, UNREACHABLE), current)
    assert conflict.value.status == 409
    assert kube.rayservices[(NAMESPACE, "alpha")]["status"]["conditions"][0]["status"] == "True"  # not lost
    assert rc.apply(kube, resource, UNREACHABLE)[0] == "updated"  # the retry reads again and succeeds


def test_desired_rayservice_is_the_builders_output_adopted_by_the_model() -> None:
    built: list[tuple[str, str]] = []

    def build(resource: dict[str, Any], image: str) -> dict[str, Any]:
        built.append((resource["metadata"]["name"], image))
        return {"metadata": {"name": "alpha", "labels": {MODEL_LABEL: "alpha"}}, "spec": {}}

    resource = {**model("alpha"), "metadata": {"name": "alpha", "namespace": "team-a", "uid": "u-1"}}
    desired = rc.desired_rayservice(resource, rc.Settings(default_image="img:1", build=build))
    assert built == [("alpha", "img:1")]
    assert desired["metadata"]["namespace"] == "team-a"
    assert desired["metadata"]["ownerReferences"] == [
        {"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ZeroCopyModel", "name": "alpha", "uid": "u-1",
         "controller": True, "blockOwnerDeletion": True},
    ]  # fmt: skip
    assert rc.owns(resource, desired)
    assert not rc.owns({"metadata": {"uid": "u-2"}}, desired)
    assert rc.owner_name(desired) == "alpha"
    assert rc.owner_name({"metadata": {}}) is None


# refused_status


def test_a_bad_spec_is_failed_with_invalid_spec_and_keeps_its_transition_time() -> None:
    resource = model("alpha")
    resource["metadata"]["generation"] = 4
    error = InvalidSpec(["serving.gpusPerReplica is 2 but ...", "route prefix /x is already used"])
    status = rc.refused_status(resource, error)
    assert (status["phase"], status["observedGeneration"]) == ("Failed", 4)
    (ready,) = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidSpec")
    assert ready["message"] == "serving.gpusPerReplica is 2 but ...; route prefix /x is already used"
    resource["status"] = {"conditions": [{**ready, "lastTransitionTime": "2020-01-01T00:00:00Z"}]}
    again = rc.refused_status(resource, InvalidSpec(["another problem"]))
    assert again["conditions"][0]["lastTransitionTime"] == "2020-01-01T00:00:00Z"  # still False: same transition


def test_an_unexpected_error_is_an_operator_error_that_says_it_is_a_bug_without_a_traceback() -> None:
    resource = model("alpha")
    resource["metadata"]["generation"] = 2
    try:
        empty: dict[str, Any] = {}
        empty["rayClusterConfig"]
    except KeyError as exc:
        status = rc.refused_status(resource, exc)
    (ready,) = status["conditions"]
    assert (status["phase"], ready["reason"], status["observedGeneration"]) == ("Failed", "OperatorError", 2)
    assert "KeyError: 'rayClusterConfig'" in ready["message"]
    assert "This is a bug in zerocopy-operator" in ready["message"]
    assert "will not retry until the spec changes" in ready["message"]
    assert "Traceback" not in ready["message"]
    assert 'File "' not in ready["message"]


# observe


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_observe_without_a_rayservice_is_pending(kube: FakeKube, info: tuple[rc.Settings, list[str]]) -> None:
    settings, asked = info
    resource = kube.add_model(model("alpha"))
    status = rc.observe(kube, resource, parse_spec(resource), settings)
    assert status["phase"] == "Pending"
    assert _condition(status, "Ready")["reason"] == "RayServiceMissing"
    assert kube.called("get_rayservice") == [(NAMESPACE, "alpha")]
    assert asked == []  # /-/info is read only once Serve runs


def test_observe_mirrors_kuberay_and_reads_the_weights_from_info(
    kube: FakeKube, info: tuple[rc.Settings, list[str]]
) -> None:
    settings, asked = info
    resource = kube.add_model(model("alpha"))
    rc.apply(kube, resource, settings)
    provisioning = rc.observe(kube, resource, parse_spec(resource), settings)
    assert (provisioning["phase"], _condition(provisioning, "Ready")["reason"]) == ("Provisioning", "Provisioning")
    assert asked == []

    kube.set_rayservice_status(NAMESPACE, "alpha", kuberay_status({"alpha": "RUNNING"}))
    status = rc.observe(kube, resource, parse_spec(resource), settings)
    assert status["phase"] == "Ready"
    assert status["endpoint"] == f"http://alpha-serve-svc.{NAMESPACE}.svc:8000/alpha"
    assert _condition(status, "Ready")["message"] == f"serving at {status['endpoint']}"
    assert status["weights"] == {
        "name": "m-0123", "revision": "0123", "bytes": 3 * 2**20, "tensors": 8, "shared": True,
        "attachSeconds": INFO.attach_seconds,
    }  # fmt: skip
    assert _condition(status, "WeightsPublished")["status"] == "True"
    assert (status["replicas"], status["readyReplicas"]) == ("2/2", 2)
    assert asked == [f"/alpha/-/info?name=alpha&namespace={NAMESPACE}"]

    kube.set_rayservice_status(NAMESPACE, "alpha", kuberay_status({"alpha": "RUNNING"}, upgrading=True))
    assert rc.observe(kube, resource, parse_spec(resource), settings)["phase"] == "Upgrading"
    assert len(asked) == 2  # read while upgrading too


def test_a_failed_application_is_failed_and_info_is_not_asked(
    kube: FakeKube, info: tuple[rc.Settings, list[str]]
) -> None:
    settings, asked = info
    resource = kube.add_model(model("alpha"))
    rc.apply(kube, resource, settings)
    failed = kuberay_status({"alpha": "DEPLOY_FAILED"})
    failed["activeServiceStatus"]["applicationStatuses"]["alpha"]["message"] = "ImportError: no module tiny_mlp"
    kube.set_rayservice_status(NAMESPACE, "alpha", failed)
    status = rc.observe(kube, resource, parse_spec(resource), settings)
    assert status["phase"] == "Failed"
    assert _condition(status, "Ready")["reason"] == "ServeFailed"
    assert _condition(status, "Ready")["message"] == "ImportError: no module tiny_mlp"
    assert _condition(status, "WeightsPublished")["reason"] == "DeployFailed"
    assert asked == []


def test_while_info_cannot_be_reached_the_status_keeps_the_weights_it_had(kube: FakeKube) -> None:
    resource = model("alpha")
    weights = {"name": "m-old", "revision": "old", "bytes": 1, "tensors": 2, "shared": True, "attachSeconds": 0.1}
    resource["status"] = {"weights": weights}
    resource = kube.add_model(resource)
    spec = parse_spec(resource)
    assert rc.read_info(UNREACHABLE, resource, spec, "http://unused") is None
    rc.apply(kube, resource, UNREACHABLE)
    kube.set_rayservice_status(NAMESPACE, "alpha", kuberay_status({"alpha": "RUNNING"}))
    status = rc.observe(kube, resource, spec, UNREACHABLE)
    assert (status["phase"], status["weights"]) == ("Ready", weights)


def test_read_info_is_none_for_an_answer_that_is_not_json(kube: FakeKube, info: tuple[rc.Settings, list[str]]) -> None:
    settings, asked = info
    resource = model("alpha")
    wrong = rc.Settings(default_image="x", info_url=settings.info_url.replace("/-/info", "/-/nope"))
    assert rc.read_info(wrong, resource, parse_spec(resource), "http://unused") is None
    assert rc.read_info(settings, resource, parse_spec(resource), "http://unused") == INFO
    assert len(asked) == 2


def test_read_info_is_none_for_json_outside_the_runtimes_contract(
    kube: FakeKube, info: tuple[rc.Settings, list[str]]
) -> None:
    settings, asked = info
    resource = model("alpha")
    old = rc.Settings(default_image="x", info_url=settings.info_url.replace("/-/info", "/-/old"))
    assert rc.read_info(old, resource, parse_spec(resource), "http://unused") is None
    assert len(asked) == 1


def test_observe_uses_the_rayservice_it_is_given_without_reading_it(kube: FakeKube) -> None:
    resource = kube.add_model(model("alpha"))
    given = {"metadata": {"name": "alpha"}, "status": kuberay_status({"alpha": "DEPLOYING"}, ready=False)}
    status = rc.observe(kube, resource, parse_spec(resource), UNREACHABLE, given)
    assert status["phase"] == "Provisioning"
    assert _condition(status, "ClusterReady")["message"] == "the Ray cluster is starting"
    assert kube.calls == []


def test_an_adapter_a_model_could_not_serve_is_a_warning_event_once(
    kube: FakeKube, info: tuple[rc.Settings, list[str]]
) -> None:
    settings, _ = info
    settings = rc.Settings(default_image="x", info_url=settings.info_url.replace("/-/info", "/-/adapters"))
    resource = model("alpha", task="text-generation", handler=None)
    resource["spec"]["serving"].pop("handler")
    resource["spec"]["model"]["architecture"] = {"transformers": "LlamaForCausalLM"}
    resource["spec"]["adapters"] = [{"name": "gone", "uri": "file://gone"}]
    rc.apply(kube, kube.add_model(resource), settings)  # as the model's own handler does first
    kube.set_rayservice_status(NAMESPACE, "alpha", kuberay_status({"alpha": "RUNNING"}))
    rc.mirror(kube, NAMESPACE, "alpha", settings)
    ready = {c["type"]: c for c in kube.models[(NAMESPACE, "alpha")]["status"]["conditions"]}
    assert (ready["Ready"]["status"], ready["AdaptersReady"]["status"]) == ("True", "False")
    assert kube.events == [
        ("alpha", "Warning", "AdapterFailed", "adapter gone (file://gone) is not served: no such file")
    ]
    rc.mirror(kube, NAMESPACE, "alpha", settings)  # the same again: no second Event
    assert len(kube.events) == 1
