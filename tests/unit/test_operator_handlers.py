"""The kopf handlers called directly, as kopf calls them, against the in-memory FakeKube.

kopf's decorators return the functions themselves, so each handler is called with the keyword arguments kopf
passes (body, patch, memo, event, settings, logger). What kopf does with the outcome is its own business and is
tested there; what matters here is the outcome: which error type (PermanentError: the spec must change;
TemporaryError: retried after a delay), what lands in `patch.status`, which Events are posted, and which
writes reach the API. kopf.event and kopf.warn need a running operator's posting context (outside one they
raise LookupError), so a recorder stands in for them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest
import urllib3.exceptions
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.unit.fake_kube import NAMESPACE, FakeKube, closed_port, kuberay_status, merge_patch, model, shared_cluster
from zerocopy_operator import handlers
from zerocopy_operator import reconcile as rc
from zerocopy_operator.kube import Kube
from zerocopy_operator.work_queue import Key
from zerocopy_runtime.contract import ROUTER_APP

pytestmark = pytest.mark.unit

LOGGER = logging.getLogger("tests.handlers")
# The handlers as the plain functions they are: kopf's decorators type them as callbacks taking every kwarg kopf passes.
reconcile_model: Callable[..., object] = handlers.reconcile_model
reconcile_cluster: Callable[..., object] = handlers.reconcile_cluster


def _then_work(handler: Callable[..., object]) -> Callable[..., None]:
    """An event handler as kopf calls it, then the work queue's worker working off what it enqueued."""

    def call(**kwargs: Any) -> None:
        handler(**kwargs)
        kwargs["memo"].queue.run_due()

    return call


rayservice_event = _then_work(handlers.rayservice_event)
cluster_rayservice_event = _then_work(handlers.cluster_rayservice_event)
cluster_event = _then_work(handlers.cluster_event)
model_event = _then_work(handlers.model_event)
start: Callable[..., object] = handlers.start


@dataclass(frozen=True)
class Posted:
    name: str
    type: str
    reason: str
    message: str


@pytest.fixture
def posted(monkeypatch: pytest.MonkeyPatch) -> list[Posted]:
    """The Events the handlers post, in order (kopf.event and kopf.warn replaced by recorders)."""
    events: list[Posted] = []

    def event(objs: Any, *, type: str, reason: str, message: str = "", backoffs: Any = None) -> None:
        ref = kopf.build_object_reference(objs)  # what kopf does first: fails on a body it could not post for
        events.append(Posted(ref["name"], type, reason, message))

    def warn(objs: Any, *, reason: str, message: str = "", backoffs: Any = None) -> None:
        event(objs, type="Warning", reason=reason, message=message)

    monkeypatch.setattr(handlers.kopf, "event", event)
    monkeypatch.setattr(handlers.kopf, "warn", warn)
    return events


@pytest.fixture
def memo() -> SimpleNamespace:
    settings = rc.Settings(default_image="runtime:test", info_url="http://127.0.0.1:9/{route}")
    memo = SimpleNamespace(kube=FakeKube(), settings=settings)
    memo.queue = handlers.new_queue(memo)
    return memo


def _reconcile_model(memo: SimpleNamespace, name: str) -> None:
    """Run the model's create/update handler on what the API holds, then the work it enqueued."""
    _handle(memo, reconcile_model, _model(memo, name))


def _reconcile_cluster(memo: SimpleNamespace, name: str = "shared") -> None:
    _handle(memo, reconcile_cluster, _stored(memo.kube.clusters, name))


def _handle(memo: SimpleNamespace, handler: Callable[..., object], resource: dict[str, Any]) -> None:
    patch = kopf.Patch()
    try:
        handler(body=_body(resource), patch=patch, memo=memo)
    finally:
        memo.queue.run_due()
        assert dict(patch) == {}, "a status goes through reconcile.write_status, never kopf's patch"


def _body(resource: dict[str, Any]) -> kopf.Body:
    """What kopf hands a handler: a read-only view of a fresh copy of the object."""
    return kopf.Body(cast(kopf.RawBody, copy.deepcopy(resource)))


def _apply(kind: dict[tuple[str, str], dict[str, Any]], name: str, patch: kopf.Patch) -> None:
    if (NAMESPACE, name) in kind and dict(patch):
        kind[(NAMESPACE, name)] = merge_patch(kind[(NAMESPACE, name)], dict(patch))


def _stored(kind: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    return kind[(NAMESPACE, name)]


def _model(memo: SimpleNamespace, name: str) -> dict[str, Any]:
    return _stored(memo.kube.models, name)


def _ready(resource_or_status: dict[str, Any]) -> dict[str, Any]:
    status = resource_or_status.get("status", resource_or_status)
    return next(c for c in status.get("conditions") or [] if c["type"] == "Ready")


def _edit(memo: SimpleNamespace, name: str, spec: dict[str, Any]) -> None:
    """A `kubectl apply` of a new spec: the generation moves."""
    stored = _model(memo, name)
    stored["spec"] = spec
    stored["metadata"]["generation"] += 1


def _on_cluster(resource: dict[str, Any], cluster: str = "shared") -> dict[str, Any]:
    spec = copy.deepcopy(resource["spec"])
    del spec["cluster"]
    return {**spec, "clusterRef": {"name": cluster}}


def _serve_config(memo: SimpleNamespace, name: str) -> list[str]:
    config = yaml.safe_load(memo.kube.rayservices[(NAMESPACE, name)]["spec"]["serveConfigV2"])
    return [app["name"] for app in config["applications"] or [] if app["name"] != ROUTER_APP]  # models only


def _unreachable_api_error() -> Exception:
    """What the real `Kube` raises when nothing answers at the API server's address (no retries: at once)."""
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{closed_port()}"
    configuration.retries = 0
    try:
        Kube(client.ApiClient(configuration)).list_models(NAMESPACE)
    except Exception as exc:
        return exc
    raise AssertionError("a closed port answered")


#: What the Kubernetes client raises when the API server is briefly away: none is an ApiException (no answer).
DROPPED = {
    "refused": urllib3.exceptions.MaxRetryError(
        None,  # type: ignore[arg-type]
        "/apis/zerocopy.dev/v1alpha1/namespaces/models/zerocopymodels",
        urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection: [Errno 111] refused"),  # type: ignore[arg-type]
    ),
    "reset": urllib3.exceptions.ProtocolError(
        "Connection aborted.", ConnectionResetError(104, "Connection reset by peer")
    ),
    "timeout": urllib3.exceptions.ReadTimeoutError(None, "/apis", "Read timed out. (read timeout=10)"),  # type: ignore[arg-type]
    "oserror": ConnectionResetError(104, "Connection reset by peer"),
}


def test_the_real_client_raises_no_api_exception_when_the_api_server_is_away() -> None:
    error = _unreachable_api_error()
    assert isinstance(error, urllib3.exceptions.HTTPError)
    assert not isinstance(error, ApiException)


# reconcile_model


def test_a_model_gets_its_rayservice_an_event_and_a_status(memo: SimpleNamespace, posted: list[Posted]) -> None:
    memo.kube.add_model(model("alpha"))
    _reconcile_model(memo, "alpha")
    assert (NAMESPACE, "alpha") in memo.kube.rayservices
    assert posted == [Posted("alpha", "Normal", "Created", "RayService alpha created")]
    status = _model(memo, "alpha")["status"]
    assert (status["phase"], status["observedGeneration"]) == ("Provisioning", 1)

    memo.kube.forget_calls()
    _reconcile_model(memo, "alpha")  # a resume after a restart: nothing to do, nothing said
    assert memo.kube.writes() == []
    assert len(posted) == 1


def test_a_bad_spec_is_a_permanent_error_with_a_condition_and_a_warning(
    memo: SimpleNamespace, posted: list[Posted]
) -> None:
    memo.kube.add_model(model("alpha", gpusPerReplica=2))  # its worker group has no GPU
    memo.kube.forget_calls()
    with pytest.raises(kopf.PermanentError, match=r"serving\.gpusPerReplica is 2"):
        _reconcile_model(memo, "alpha")
    status = _model(memo, "alpha")["status"]
    assert (status["phase"], _ready(status)["reason"]) == ("Failed", "InvalidSpec")
    (warning,) = posted
    assert (warning.type, warning.reason, warning.message) == ("Warning", "InvalidSpec", _ready(status)["message"])
    assert memo.kube.rayservices == {}
    assert [c.method for c in memo.kube.writes()] == ["patch_model_status"]  # the status, and nothing else


def test_a_bug_is_an_operator_error_reported_once(memo: SimpleNamespace, posted: list[Posted]) -> None:
    def broken(resource: dict[str, Any], image: str) -> dict[str, Any]:
        raise KeyError("injected")

    memo.settings = rc.Settings(default_image="runtime:test", build=broken)
    memo.kube.add_model(model("alpha"))
    with pytest.raises(kopf.PermanentError):
        _reconcile_model(memo, "alpha")
    assert _ready(_model(memo, "alpha"))["reason"] == "OperatorError"
    assert [(p.type, p.reason) for p in posted] == [("Warning", "OperatorError")]


@pytest.mark.parametrize("method", ["list_models", "get_rayservice", "create_rayservice"])
def test_an_api_error_is_retried_and_pins_nothing(memo: SimpleNamespace, posted: list[Posted], method: str) -> None:
    memo.kube.add_model(model("alpha"))
    memo.kube.fail(method, ApiException(status=500, reason="Internal Server Error"))
    with pytest.raises(kopf.TemporaryError) as retry:
        _reconcile_model(memo, "alpha")
    assert not isinstance(retry.value, kopf.PermanentError)
    assert retry.value.delay == 10
    assert "500" in str(retry.value)
    assert "status" not in _model(memo, "alpha")
    assert posted == []
    _reconcile_model(memo, "alpha")  # the retry
    assert _model(memo, "alpha")["status"]["phase"] == "Provisioning"


@pytest.mark.parametrize("status", [403, 404, 409, 429, 503])
def test_an_answer_that_may_change_is_retried(memo: SimpleNamespace, posted: list[Posted], status: int) -> None:
    memo.kube.add_model(model("alpha"))
    memo.kube.fail("create_rayservice", ApiException(status=status))
    with pytest.raises(kopf.TemporaryError) as retry:
        _reconcile_model(memo, "alpha")
    assert not isinstance(retry.value, kopf.PermanentError)
    assert "status" not in _model(memo, "alpha")


def test_a_request_the_api_server_refuses_is_reported_with_its_message_not_retried(
    memo: SimpleNamespace, posted: list[Posted]
) -> None:
    """A RayService KubeRay's CRD refuses (422) fails the same way each time: a condition and an Event say why."""
    memo.kube.add_model(model("alpha"))
    refusal = ApiException(status=422, reason="Unprocessable Entity")
    refusal.body = json.dumps({"kind": "Status", "message": 'RayService.ray.io "alpha" is invalid: spec.x: bad'})
    memo.kube.fail("create_rayservice", refusal)
    with pytest.raises(kopf.PermanentError):
        _reconcile_model(memo, "alpha")
    ready = _ready(_model(memo, "alpha"))
    assert ready["reason"] == "OperatorError"
    assert 'the Kubernetes API refused the request with 422: RayService.ray.io "alpha" is invalid' in ready["message"]
    assert "HTTP response headers" not in ready["message"]
    assert [(p.type, p.reason) for p in posted] == [("Warning", "OperatorError")]
    assert memo.kube.rayservices == {}


@pytest.mark.parametrize("dropped", list(DROPPED), ids=list(DROPPED))
@pytest.mark.parametrize("method", ["list_models", "get_rayservice", "create_rayservice"])
def test_a_dropped_api_connection_is_retried_not_pinned_as_an_operator_error(
    memo: SimpleNamespace, posted: list[Posted], method: str, dropped: str
) -> None:
    """An apiserver restart must not leave a good model Failed with OperatorError until someone edits its spec."""
    memo.kube.add_model(model("alpha"))
    memo.kube.fail(method, DROPPED[dropped])
    with pytest.raises(kopf.TemporaryError):
        _reconcile_model(memo, "alpha")
    assert "status" not in _model(memo, "alpha")
    assert posted == []
    _reconcile_model(memo, "alpha")
    assert (NAMESPACE, "alpha") in memo.kube.rayservices


@pytest.mark.parametrize("method", ["get_cluster", "get_rayservice", "list_clusters"])
def test_a_dropped_connection_while_joining_a_cluster_is_retried(
    memo: SimpleNamespace, posted: list[Posted], method: str
) -> None:
    cluster, chat, _ = shared_cluster()
    memo.kube.add_cluster(cluster)
    memo.kube.add_model(chat)
    memo.kube.fail(method, DROPPED["reset"])
    with pytest.raises(kopf.TemporaryError):
        _reconcile_model(memo, "chat")
    assert posted == []
    if method != "list_clusters":  # that one fails after the cluster wrote chat's status (Provisioning)
        assert "status" not in _model(memo, "chat")
    else:
        assert _model(memo, "chat")["status"]["phase"] == "Provisioning"
    _reconcile_model(memo, "chat")
    assert _serve_config(memo, "shared") == ["chat"]


def test_the_real_clients_connection_error_is_retried(memo: SimpleNamespace, posted: list[Posted]) -> None:
    memo.kube.add_model(model("alpha"))
    memo.kube.fail("list_models", _unreachable_api_error())
    with pytest.raises(kopf.TemporaryError):
        _reconcile_model(memo, "alpha")
    assert "status" not in _model(memo, "alpha")
    assert posted == []


def test_a_rayservice_of_someone_else_is_a_conflict_retried_later(memo: SimpleNamespace, posted: list[Posted]) -> None:
    memo.kube.add_model(model("alpha"))
    memo.kube.add_rayservice({"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "alpha"}})
    memo.kube.forget_calls()
    with pytest.raises(kopf.TemporaryError) as retry:
        _reconcile_model(memo, "alpha")
    assert retry.value.delay == 60
    (warning,) = posted
    assert (warning.type, warning.reason) == ("Warning", "Conflict")
    assert "RayService alpha already exists and is not owned by this ZeroCopyModel" in warning.message
    assert "status" not in _model(memo, "alpha")
    assert memo.kube.writes() == []


def test_a_model_moving_onto_a_cluster_and_back(memo: SimpleNamespace, posted: list[Posted]) -> None:
    cluster, _, _ = shared_cluster()
    memo.kube.add_cluster(cluster)
    own = memo.kube.add_model(model("alpha"))
    _reconcile_model(memo, "alpha")
    posted.clear()
    memo.kube.forget_calls()

    _edit(memo, "alpha", _on_cluster(own))
    _reconcile_model(memo, "alpha")
    assert (NAMESPACE, "alpha") not in memo.kube.rayservices  # its own RayService is given up
    assert memo.kube.called("delete_rayservice") == [(NAMESPACE, "alpha")]
    assert _serve_config(memo, "shared") == ["alpha"]
    assert posted == [Posted("alpha", "Normal", "Scheduled", "serving on ZeroCopyCluster shared")]
    # The cluster's reconciliation wrote the model's status, once.
    assert [c.args[1] for c in memo.kube.calls if c.method == "patch_model_status"] == ["alpha"]
    status = _model(memo, "alpha")["status"]
    assert (status["cluster"], status["observedGeneration"]) == ("shared", 2)
    assert status["endpoint"] == f"http://shared-serve-svc.{NAMESPACE}.svc:8000/alpha"
    assert [m["name"] for m in memo.kube.clusters[(NAMESPACE, "shared")]["status"]["models"]] == ["alpha"]

    _edit(memo, "alpha", own["spec"])  # back to a cluster of its own: the shared cluster drops its application
    _reconcile_model(memo, "alpha")
    assert (NAMESPACE, "alpha") in memo.kube.rayservices
    assert _serve_config(memo, "shared") == []
    assert memo.kube.clusters[(NAMESPACE, "shared")]["status"]["models"] == []
    assert _model(memo, "alpha")["status"]["endpoint"] == f"http://alpha-serve-svc.{NAMESPACE}.svc:8000/alpha"


def test_a_model_refused_by_its_cluster_gets_a_warning_not_an_error(
    memo: SimpleNamespace, posted: list[Posted]
) -> None:
    memo.kube.add(*shared_cluster())
    _model(memo, "minilm")["spec"]["serving"]["gpusPerReplica"] = 2  # more than the cluster's pods have
    _reconcile_model(memo, "minilm")  # refused until its spec changes: a status and a warning, no retry loop
    assert _ready(_model(memo, "minilm"))["reason"] == "InvalidSpec"
    assert [(p.name, p.type, p.reason) for p in posted] == [("minilm", "Warning", "InvalidSpec")]
    assert _serve_config(memo, "shared") == ["chat"]


def test_a_model_naming_a_missing_cluster_waits_for_it(memo: SimpleNamespace, posted: list[Posted]) -> None:
    memo.kube.add_model({**model("alpha"), "spec": _on_cluster(model("alpha"), "later")})
    _reconcile_model(memo, "alpha")
    assert (_model(memo, "alpha")["status"]["phase"], _ready(_model(memo, "alpha"))["reason"]) == (
        "Pending", "ClusterNotFound",
    )  # fmt: skip
    assert memo.kube.rayservices == {}
    assert posted == []


def test_a_model_with_a_schema_error_on_a_cluster_is_refused_and_its_cluster_says_so(
    memo: SimpleNamespace, posted: list[Posted]
) -> None:
    memo.kube.add(*shared_cluster())
    _model(memo, "minilm")["spec"]["serving"]["replicas"] = 0
    with pytest.raises(kopf.PermanentError, match=r"spec\.serving\.replicas"):
        _reconcile_model(memo, "minilm")
    assert _ready(_model(memo, "minilm"))["reason"] == "InvalidSpec"
    entries = {m["name"]: m for m in memo.kube.clusters[(NAMESPACE, "shared")]["status"]["models"]}
    assert entries["minilm"]["application"] == "Refused"
    assert entries["chat"]["application"] != "Refused"


# reconcile_cluster


@pytest.fixture
def shared(memo: SimpleNamespace, posted: list[Posted]) -> SimpleNamespace:
    """memo holding examples/shared-cluster.yaml, reconciled once."""
    memo.kube.add(*shared_cluster())
    _reconcile_cluster(memo)
    memo.kube.forget_calls()
    return memo


def test_a_cluster_gets_its_rayservice_and_writes_its_models_statuses(
    memo: SimpleNamespace, posted: list[Posted]
) -> None:
    memo.kube.add(*shared_cluster())
    _reconcile_cluster(memo)
    assert _serve_config(memo, "shared") == ["chat", "minilm"]
    assert posted == [Posted("shared", "Normal", "Created", "RayService shared created")]
    assert _stored(memo.kube.clusters, "shared")["status"]["modelsReady"] == "0/2"
    assert len(memo.kube.called("patch_cluster_status")) == 1
    assert {c[1] for c in memo.kube.called("patch_model_status")} == {"chat", "minilm"}


def test_an_invalid_cluster_is_a_permanent_error_and_its_models_wait(
    memo: SimpleNamespace, posted: list[Posted]
) -> None:
    memo.kube.add(*shared_cluster())
    memo.kube.clusters[(NAMESPACE, "shared")]["spec"]["workerGroups"][0]["gpus"] = -1
    with pytest.raises(kopf.PermanentError):
        _reconcile_cluster(memo)
    assert _ready(memo.kube.clusters[(NAMESPACE, "shared")])["reason"] == "InvalidSpec"
    assert [(p.type, p.reason) for p in posted] == [("Warning", "InvalidSpec")]
    assert {_ready(_model(memo, n))["reason"] for n in ("chat", "minilm")} == {"ClusterInvalid"}
    assert memo.kube.rayservices == {}


@pytest.mark.parametrize(
    "error", [ApiException(status=503), *DROPPED.values()], ids=["503", *(f"dropped-{k}" for k in DROPPED)]
)
def test_an_api_hiccup_while_reconciling_a_cluster_is_retried(
    memo: SimpleNamespace, posted: list[Posted], error: Exception
) -> None:
    memo.kube.add(*shared_cluster())
    memo.kube.fail("list_models", error)
    with pytest.raises(kopf.TemporaryError):
        _reconcile_cluster(memo)
    assert "status" not in memo.kube.clusters[(NAMESPACE, "shared")]
    assert posted == []
    _reconcile_cluster(memo)
    assert _serve_config(memo, "shared") == ["chat", "minilm"]


def test_a_cluster_whose_rayservice_is_someone_elses_is_a_conflict(memo: SimpleNamespace, posted: list[Posted]) -> None:
    cluster, _, _ = shared_cluster()
    memo.kube.add_cluster(cluster)
    memo.kube.add_rayservice({"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "shared"}})
    with pytest.raises(kopf.TemporaryError):
        _reconcile_cluster(memo)
    assert [(p.type, p.reason) for p in posted] == [("Warning", "Conflict")]


# Events


def _event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": copy.deepcopy(obj)}


def test_a_rayservice_deleted_by_hand_is_restored(memo: SimpleNamespace, posted: list[Posted]) -> None:
    memo.kube.add_model(model("alpha"))
    _reconcile_model(memo, "alpha")
    original = memo.kube.rayservices.pop((NAMESPACE, "alpha"))
    posted.clear()
    rayservice_event(event=_event("DELETED", original), memo=memo, logger=LOGGER)
    restored = memo.kube.rayservices[(NAMESPACE, "alpha")]
    assert restored["metadata"]["uid"] != original["metadata"]["uid"]
    assert restored["spec"] == original["spec"]
    assert memo.kube.events == [("alpha", "Normal", "Restored", "RayService alpha created after a change by hand")]


def test_a_rayservice_edited_by_hand_is_put_back(memo: SimpleNamespace, posted: list[Posted]) -> None:
    memo.kube.add_model(model("alpha"))
    _reconcile_model(memo, "alpha")
    original = copy.deepcopy(memo.kube.rayservices[(NAMESPACE, "alpha")]["spec"])
    memo.kube.rayservices[(NAMESPACE, "alpha")]["spec"]["rayClusterConfig"]["rayVersion"] = "2.0.0"
    posted.clear()
    rayservice_event(event=_event("MODIFIED", memo.kube.rayservices[(NAMESPACE, "alpha")]), memo=memo, logger=LOGGER)
    assert memo.kube.rayservices[(NAMESPACE, "alpha")]["spec"] == original
    assert [reason for _, _, reason, _ in memo.kube.events] == ["Restored"]


def test_kuberays_progress_is_mirrored_once(memo: SimpleNamespace, posted: list[Posted]) -> None:
    memo.kube.add_model(model("alpha"))
    _reconcile_model(memo, "alpha")
    memo.kube.set_rayservice_status(NAMESPACE, "alpha", kuberay_status({"alpha": "RUNNING"}))
    memo.kube.forget_calls()
    event = _event("MODIFIED", memo.kube.rayservices[(NAMESPACE, "alpha")])
    rayservice_event(event=event, memo=memo, logger=LOGGER)
    assert [c.method for c in memo.kube.writes()] == ["patch_model_status"]
    assert _model(memo, "alpha")["status"]["phase"] == "Ready"
    memo.kube.forget_calls()
    rayservice_event(event=event, memo=memo, logger=LOGGER)  # the same again: nothing to write
    assert memo.kube.writes() == []
    assert posted[1:] == []


def test_the_rayservice_of_a_refused_or_moved_model_is_left_alone(memo: SimpleNamespace, posted: list[Posted]) -> None:
    memo.kube.add_model(model("alpha"))
    _reconcile_model(memo, "alpha")
    rayservice = copy.deepcopy(memo.kube.rayservices[(NAMESPACE, "alpha")])
    _edit(memo, "alpha", {**_model(memo, "alpha")["spec"], "serving": {"replicas": 0}})
    with pytest.raises(kopf.PermanentError):
        _reconcile_model(memo, "alpha")
    memo.kube.forget_calls()
    rayservice_event(event=_event("DELETED", rayservice), memo=memo, logger=LOGGER)
    assert memo.kube.calls == [("get_model", (NAMESPACE, "alpha"))]  # refused: no restore, no retry storm
    _edit(memo, "alpha", _on_cluster(model("alpha")))
    memo.kube.forget_calls()
    rayservice_event(event=_event("DELETED", rayservice), memo=memo, logger=LOGGER)
    assert memo.kube.writes() == []


def test_a_failure_while_mirroring_is_logged_not_raised(
    memo: SimpleNamespace, posted: list[Posted], caplog: pytest.LogCaptureFixture
) -> None:
    memo.kube.add_model(model("alpha"))
    _reconcile_model(memo, "alpha")
    memo.kube.fail("list_models", DROPPED["refused"])
    with caplog.at_level(logging.WARNING):
        rayservice_event(event=_event("DELETED", {"metadata": {"namespace": NAMESPACE, "labels": {
            "zerocopy.dev/model": "alpha"}}}), memo=memo, logger=LOGGER)  # fmt: skip
    assert "Reconciling ZeroCopyModel models/alpha failed" in caplog.text
    assert memo.queue.pending() == [Key("model", NAMESPACE, "alpha")]  # retried after a back-off


def test_a_deleted_model_leaves_its_cluster(shared: SimpleNamespace) -> None:
    minilm = shared.kube.models.pop((NAMESPACE, "minilm"))
    model_event(event=_event("DELETED", minilm), memo=shared)
    assert _serve_config(shared, "shared") == ["chat"]
    assert [m["name"] for m in shared.kube.clusters[(NAMESPACE, "shared")]["status"]["models"]] == ["chat"]
    shared.kube.forget_calls()
    model_event(event=_event("MODIFIED", _model(shared, "chat")), memo=shared)
    assert shared.kube.calls == []


def test_a_deleted_model_lets_a_model_it_blocked_be_retried(memo: SimpleNamespace, posted: list[Posted]) -> None:
    memo.kube.add_model(model("older", created="2026-01-01T00:00:00Z", routePrefix="/same"))
    memo.kube.add_model(model("newer", created="2026-01-02T00:00:00Z", routePrefix="/same"))
    memo.kube.add_model(model("broken", replicas=2, gpusPerReplica=4))
    for name in ("older", "newer", "broken"):
        with contextlib.suppress(kopf.PermanentError):
            _reconcile_model(memo, name)
    assert _ready(_model(memo, "newer"))["reason"] == "InvalidSpec"
    older = memo.kube.models.pop((NAMESPACE, "older"))
    memo.kube.forget_calls()
    model_event(event=_event("DELETED", older), memo=memo)
    ((namespace, name, annotations),) = memo.kube.called("annotate_model")  # broken stays refused: not touched
    assert (namespace, name, list(annotations)) == (NAMESPACE, "newer", ["zerocopy.dev/retry"])
    assert "zerocopy.dev/retry" in _model(memo, "newer")["metadata"]["annotations"]


@pytest.mark.parametrize("error", [ApiException(status=500), DROPPED["refused"]], ids=["500", "dropped"])
@pytest.mark.parametrize("after", [0, 1], ids=["listing", "checking"])
def test_a_failure_retrying_refused_models_is_logged_not_raised(
    memo: SimpleNamespace, posted: list[Posted], caplog: pytest.LogCaptureFixture, error: Exception, after: int
) -> None:
    """Whether it fails listing the models or checking a refused one, it says so (not "still refused")."""
    memo.kube.add_model(model("refused", gpusPerReplica=4))
    with pytest.raises(kopf.PermanentError):
        _reconcile_model(memo, "refused")
    memo.kube.fail("list_models", error, after=after)
    with caplog.at_level(logging.WARNING):
        model_event(event=_event("DELETED", model("gone")), memo=memo)
    assert "Reconciling the refused models of namespace models failed" in caplog.text
    assert memo.queue.pending() == [Key("refused", NAMESPACE)]


def test_a_deleted_cluster_leaves_its_models_waiting(shared: SimpleNamespace) -> None:
    cluster = shared.kube.clusters.pop((NAMESPACE, "shared"))
    shared.kube.rayservices.clear()  # the garbage collector follows the owner reference
    cluster_event(event=_event("DELETED", cluster), memo=shared)
    assert {_ready(_model(shared, n))["reason"] for n in ("chat", "minilm")} == {"ClusterNotFound"}
    assert "endpoint" not in _model(shared, "chat")["status"]


def test_kuberays_progress_on_a_cluster_reaches_its_models(shared: SimpleNamespace) -> None:
    shared.kube.set_rayservice_status(NAMESPACE, "shared", kuberay_status({"chat": "RUNNING", "minilm": "DEPLOYING"}))
    event = _event("MODIFIED", shared.kube.rayservices[(NAMESPACE, "shared")])
    cluster_rayservice_event(event=event, memo=shared)
    assert _model(shared, "chat")["status"]["phase"] == "Ready"
    assert _model(shared, "minilm")["status"]["phase"] == "Provisioning"
    assert shared.kube.clusters[(NAMESPACE, "shared")]["status"]["modelsReady"] == "1/2"
    shared.kube.fail("get_cluster", DROPPED["reset"])
    cluster_rayservice_event(event=event, memo=shared)  # logged, and tried again after a back-off
    assert shared.queue.pending() == [Key("cluster", NAMESPACE, "shared")]


# start


def test_start_refuses_to_run_without_kuberay_and_names_the_helm_command() -> None:
    memo = SimpleNamespace(kube=FakeKube(kuberay=False))
    with pytest.raises(kopf.PermanentError) as refused:
        start(settings=kopf.OperatorSettings(), memo=memo, logger=LOGGER)
    assert "rayservices.ray.io is not installed" in str(refused.value)
    assert "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0" in str(refused.value)


def test_start_keeps_kopfs_bookkeeping_out_of_the_status_and_watches_no_crds() -> None:
    settings = kopf.OperatorSettings()
    memo = SimpleNamespace(kube=FakeKube())
    start(settings=settings, memo=memo, logger=LOGGER)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert settings.scanning.disabled
    assert settings.posting.level == logging.WARNING
    assert memo.kube.called("kuberay_installed") == [()]


@pytest.fixture(autouse=True)
def _no_leftover_failures(memo: SimpleNamespace) -> Iterator[None]:
    """A failure a test set up but never triggered would mean the test did not test what it says."""
    yield
    assert memo.kube.pending_failures() == {}
