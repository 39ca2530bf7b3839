"""kopf handlers: thin translations from events to `reconcile` and `clusters` calls, and outcomes to kopf's terms.

A resource's create, update and resume handlers reconcile it and translate
the outcome: a bad spec is a PermanentError (condition, Event, no retry until
the spec changes); "not yet" and API hiccups, a dropped connection included,
are TemporaryErrors with a back-off. Event handlers (a RayService changed, a
model or cluster deleted) only enqueue the resource to look at again; the
work queue's worker reconciles it from what the API holds then
(`work_queue`). Every status goes through `reconcile.write_status`.
There are no deletion handlers and no timers, so kopf adds no finalizer:
a RayService goes with its ZeroCopyModel or ZeroCopyCluster by owner
reference, and a deleted model's application goes with the next
reconciliation of its cluster, which its deletion event starts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from . import clusters as cl
from . import reconcile as rc
from .api import CLUSTER_PLURAL, GROUP, PLURAL, VERSION
from .kube import KUBERAY_CRD, RAY_GROUP, RAY_PLURAL, RAY_VERSION, IndexedKube, Kube
from .manifests import CLUSTER_LABEL, MODEL_LABEL
from .placement import cluster_ref
from .status import REFUSED
from .work_queue import Key, WorkQueue

MODELS = (GROUP, VERSION, PLURAL)
CLUSTERS = (GROUP, VERSION, CLUSTER_PLURAL)
RAYSERVICES = (RAY_GROUP, RAY_VERSION, RAY_PLURAL)
#: No answer from the API server (restarting, a dropped connection, a timeout), as the client raises it from
#: urllib3 or the socket. Not every OSError: a bug that raises one (a missing file) is reported, not retried forever.
UNANSWERED = (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)
#: Answers that refuse the request itself (a RayService KubeRay's CRD refuses, a malformed patch): the same request
#: fails again, so they are reported like a bug, not retried.
REFUSED_REQUESTS = frozenset({400, 422})


@kopf.on.startup()
def start(settings: kopf.OperatorSettings, memo: Any, logger: logging.Logger | logging.LoggerAdapter, **_: Any) -> None:
    """Keep kopf's bookkeeping in annotations (the status schema is ours) and check for KubeRay."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Our resources are known up front: no watching of CRDs and namespaces, so the operator needs no
    # cluster-wide permission beyond its own resources (the chart's namespaced install has none at all).
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING  # Events for problems; our own Normal events say what changed
    memo.kube = getattr(memo, "kube", None) or Kube()
    if not memo.kube.kuberay_installed():
        raise kopf.PermanentError(
            f"KubeRay's CRD {KUBERAY_CRD} is not installed in this cluster. Install KubeRay first "
            "(helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0), then restart the operator."
        )
    logger.info("KubeRay's %s is installed; serving ZeroCopyModels", KUBERAY_CRD)


@kopf.index(*MODELS)
def models_by_namespace(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str | None, dict[str, Any]]:
    """Every model, by namespace, as the watch delivers it: a reconcile reads its namespace from memory."""
    return {namespace: _plain(body)}


@kopf.index(*CLUSTERS)
def clusters_by_namespace(namespace: str | None, body: kopf.Body, **_: Any) -> dict[str | None, dict[str, Any]]:
    """Every ZeroCopyCluster, by namespace, as the watch delivers it."""
    return {namespace: _plain(body)}


def _kube(memo: Any, given: dict[str, Any]) -> Any:
    """The API, with listings from kopf's indexes when kopf passed them (it does to every handler)."""
    models, clusters = given.get("models_by_namespace"), given.get("clusters_by_namespace")
    if models is None or clusters is None:
        return memo.kube
    memo.indexed = IndexedKube(memo.kube, models, clusters)  # live views: the work queue's worker reads them too
    return memo.indexed


@kopf.on.startup()
async def start_work_queue(memo: Any, **_: Any) -> None:
    """The worker that reconciles what events enqueue (`work_queue`), in kopf's loop until it stops."""
    memo.queue = getattr(memo, "queue", None) or new_queue(memo)
    memo.queue_task = asyncio.create_task(memo.queue.run(), name="zerocopy-work-queue")


@kopf.on.cleanup()
async def stop_work_queue(memo: Any, **_: Any) -> None:
    task = getattr(memo, "queue_task", None)
    if task is not None:
        task.cancel()


def new_queue(memo: Any) -> WorkQueue:
    """The queue of level-triggered work: each key reconciled with what the API (and kopf's indexes) hold then."""

    def work(key: Key) -> None:
        kube = getattr(memo, "indexed", None) or memo.kube
        if key.kind == "cluster":
            cl.sync_cluster(kube, key.namespace, key.name, memo.settings)
        elif key.kind == "model":
            rc.mirror(kube, key.namespace, key.name, memo.settings)
        else:
            _retry_refused(kube, key.namespace)

    return WorkQueue(work, retryable=_transient)


def _enqueue(memo: Any, given: dict[str, Any], *keys: Key) -> None:
    """An event handler's only job: say what to reconcile."""
    _kube(memo, given)  # the worker's listings come from kopf's indexes too
    for key in keys:
        memo.queue.add(key)


@kopf.on.resume(*MODELS)
@kopf.on.create(*MODELS)
@kopf.on.update(*MODELS)
def reconcile_model(body: kopf.Body, memo: Any, **given: Any) -> None:
    """Validate, build, adopt, apply, and write what was observed; a model on a cluster has that cluster do it."""
    resource = _plain(body)
    ref = cluster_ref(resource)
    kube = _kube(memo, given)
    try:
        spec = rc.check(kube, resource)
        if ref is not None:
            _join_cluster(memo, kube, body, resource, ref)
            return
        action, _ = rc.apply(kube, resource, memo.settings)
        _leave_clusters(memo, kube, resource)
        rc.write_status(kube, resource, rc.observe(kube, resource, spec, memo.settings))
    except Exception as exc:
        _translate(memo, kube, body, resource, exc)
        if ref is not None:  # its cluster keeps serving its previous application and lists it as refused
            _enqueue(memo, given, Key("cluster", resource["metadata"]["namespace"], ref))
        raise kopf.PermanentError(str(exc)) from None
    if action != "unchanged":
        kopf.event(
            body, type="Normal", reason=action.title(), message=f"RayService {resource['metadata']['name']} {action}"
        )


def _join_cluster(memo: Any, kube: Any, body: kopf.Body, resource: dict[str, Any], ref: str) -> None:
    """Serve the model on its ZeroCopyCluster: drop a RayService of its own, have the cluster(s) reconcile."""
    meta = resource["metadata"]
    own = kube.get_rayservice(meta["namespace"], meta["name"])
    if own is not None and rc.owns(resource, own):  # it had a cluster of its own until this edit
        kube.delete_rayservice(meta["namespace"], meta["name"])
    outcome = cl.sync_cluster(kube, meta["namespace"], ref, memo.settings)
    _leave_clusters(memo, kube, resource, but=ref)
    status = (outcome.models.get(meta["name"]) if outcome else None) or {}
    ready: dict[str, Any] = next(iter(status.get("conditions") or []), {})
    if ready.get("reason") in REFUSED:
        kopf.warn(body, reason=ready["reason"], message=ready.get("message", ""))
    elif outcome is not None and outcome.action != "unchanged":
        kopf.event(body, type="Normal", reason="Scheduled", message=f"serving on ZeroCopyCluster {ref}")


def _leave_clusters(memo: Any, kube: Any, resource: dict[str, Any], but: str | None = None) -> None:
    """Reconcile the clusters that still list the model (it moved to another cluster, or to its own)."""
    meta = resource["metadata"]
    for name in cl.holding(kube, meta["namespace"], meta["name"]):
        if name != but:
            cl.sync_cluster(kube, meta["namespace"], name, memo.settings)


@kopf.on.resume(*CLUSTERS)
@kopf.on.create(*CLUSTERS)
@kopf.on.update(*CLUSTERS)
def reconcile_cluster(body: kopf.Body, memo: Any, **given: Any) -> None:
    """Validate, plan the models, build, adopt, apply, and write the cluster's and its models' statuses."""
    resource = _plain(body)
    namespace, name = resource["metadata"]["namespace"], resource["metadata"]["name"]
    kube = _kube(memo, given)
    try:
        outcome = cl.reconcile_cluster(kube, resource, memo.settings)
        cl.write(kube, namespace, resource, outcome)
    except Exception as exc:
        _translate(memo, kube, body, resource, exc)
        _enqueue(memo, given, Key("cluster", namespace, name))  # its models say that they wait for it to be fixed
        raise kopf.PermanentError(str(exc)) from None
    if outcome.action != "unchanged":
        kopf.event(body, type="Normal", reason=outcome.action.title(), message=f"RayService {name} {outcome.action}")


def _translate(memo: Any, kube: Any, body: kopf.Body, resource: dict[str, Any], exc: Exception) -> None:
    """A failed reconcile in kopf's terms: returns for a refused spec (its status and Event written, the caller
    raises PermanentError); raises TemporaryError for anything that may pass (an API error, no answer, a
    RayService someone else owns)."""
    if isinstance(exc, rc.NotOurs):
        kopf.warn(body, reason="Conflict", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=60) from None
    if _transient(exc):
        raise _retry(exc) from None
    status = rc.refused_status(resource, exc)
    try:
        rc.write_status(kube, resource, status)
    except Exception as failed:
        if _transient(failed):
            raise _retry(failed) from None
        raise
    kopf.warn(body, reason=status["conditions"][0]["reason"], message=status["conditions"][0]["message"])


@kopf.on.event(*CLUSTERS)
def cluster_event(event: kopf.RawEvent, memo: Any, **given: Any) -> None:
    """A deleted cluster leaves its models waiting for it, each saying so."""
    if event["type"] == "DELETED":
        meta = event["object"]["metadata"]
        _enqueue(memo, given, Key("cluster", meta["namespace"], meta["name"]))


@kopf.on.event(*RAYSERVICES, labels={CLUSTER_LABEL: kopf.PRESENT})
def cluster_rayservice_event(event: kopf.RawEvent, memo: Any, **given: Any) -> None:
    """Mirror KubeRay's progress into the cluster and each model's status; put back a RayService changed by hand."""
    meta = event["object"]["metadata"]
    _enqueue(memo, given, Key("cluster", meta["namespace"], (meta.get("labels") or {})[CLUSTER_LABEL]))


@kopf.on.event(*RAYSERVICES, labels={MODEL_LABEL: kopf.PRESENT})
def rayservice_event(event: kopf.RawEvent, memo: Any, **given: Any) -> None:
    """Mirror KubeRay's progress into the model, and put back a RayService deleted or edited by hand."""
    rayservice: dict[str, Any] = dict(event["object"])
    name = rc.owner_name(rayservice)
    if name:
        _enqueue(memo, given, Key("model", rayservice["metadata"]["namespace"], name))


@kopf.on.event(*MODELS)
def model_event(event: kopf.RawEvent, memo: Any, **given: Any) -> None:
    """When a model goes, its cluster drops its application, and the models it was blocking are retried."""
    if event["type"] != "DELETED":
        return
    deleted: dict[str, Any] = dict(event["object"])
    namespace = deleted["metadata"]["namespace"]
    affected = set(cl.holding(_kube(memo, given), namespace, deleted["metadata"]["name"]))
    if (ref := cluster_ref(deleted)) is not None:
        affected.add(ref)
    _enqueue(memo, given, *(Key("cluster", namespace, c) for c in sorted(affected)), Key("refused", namespace))


def _retry_refused(kube: Any, namespace: str) -> None:
    for other in kube.list_models(namespace):
        if rc.refused(other):
            try:
                rc.check(kube, other)
            except (ApiException, *UNANSWERED):
                raise  # not "still refused": the API did not answer
            except Exception:  # still refused: its condition already says why
                continue
            # Valid now: touch an annotation so that kopf runs the model's update handler.
            kube.annotate_model(namespace, other["metadata"]["name"], {f"{GROUP}/retry": rc.now()})


def _transient(exc: BaseException) -> bool:
    """Whether the same request may succeed later: no answer, or an answer other than a refusal of the request
    (409 on a concurrent change, 403 until RBAC is fixed, 404 of a namespace being made, 429, 5xx)."""
    if isinstance(exc, ApiException):
        return exc.status not in REFUSED_REQUESTS
    return isinstance(exc, UNANSWERED)


def _retry(exc: Exception) -> kopf.TemporaryError:
    """A short back-off, for a transient error: never a condition that pins the resource until its spec changes."""
    if isinstance(exc, ApiException):
        return kopf.TemporaryError(f"Kubernetes API error {exc.status}: {rc.api_message(exc)}; retrying", delay=10)
    return kopf.TemporaryError(f"Kubernetes API unreachable ({type(exc).__name__}: {exc}); retrying", delay=10)


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {key: body[key] for key in body}
