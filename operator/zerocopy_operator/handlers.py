"""kopf handlers: thin translations from events to `reconcile` and `clusters` calls, and outcomes to kopf's terms.

A bad spec is a PermanentError (condition, Event, no retry until the spec
changes); "not yet" and API hiccups are TemporaryErrors with a back-off.
There are no deletion handlers and no timers, so kopf adds no finalizer:
a RayService goes with its ZeroCopyModel or ZeroCopyCluster by owner
reference, and a deleted model's application goes with the next
reconciliation of its cluster, which its deletion event starts.
"""

from __future__ import annotations

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
    return memo.kube if models is None or clusters is None else IndexedKube(memo.kube, models, clusters)


@kopf.on.resume(*MODELS)
@kopf.on.create(*MODELS)
@kopf.on.update(*MODELS)
def reconcile_model(body: kopf.Body, patch: kopf.Patch, memo: Any, **given: Any) -> None:
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
    except rc.NotOurs as exc:
        kopf.warn(body, reason="Conflict", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=60) from None
    except Exception as exc:  # a bad spec, a refused request, or a bug: retrying the same spec cannot help
        if _transient(exc):
            raise _retry(exc) from None
        status = rc.refused_status(resource, exc)
        patch.status.update(status)
        kopf.warn(body, reason=status["conditions"][0]["reason"], message=status["conditions"][0]["message"])
        if ref is not None:  # its cluster keeps serving its previous application and lists it as refused
            _sync_quietly(memo, kube, resource["metadata"]["namespace"], ref)
        raise kopf.PermanentError(str(exc)) from None
    if action != "unchanged":
        kopf.event(
            body, type="Normal", reason=action.title(), message=f"RayService {resource['metadata']['name']} {action}"
        )
    patch.status.update(rc.observe(kube, resource, spec, memo.settings))


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


def _sync_quietly(memo: Any, kube: Any, namespace: str, cluster: str) -> None:
    """From an event: a failure is logged, and the cluster's own handler reports what is wrong with it."""
    try:
        cl.sync_cluster(kube, namespace, cluster, memo.settings)
    except Exception as exc:
        logging.getLogger(__name__).warning("Not reconciling ZeroCopyCluster %s/%s: %s", namespace, cluster, exc)


@kopf.on.resume(*CLUSTERS)
@kopf.on.create(*CLUSTERS)
@kopf.on.update(*CLUSTERS)
def reconcile_cluster(body: kopf.Body, patch: kopf.Patch, memo: Any, **given: Any) -> None:
    """Validate, plan the models, build, adopt, apply, and write the cluster's and its models' statuses."""
    resource = _plain(body)
    namespace, name = resource["metadata"]["namespace"], resource["metadata"]["name"]
    kube = _kube(memo, given)
    try:
        outcome = cl.reconcile_cluster(kube, resource, memo.settings)
        cl.write(kube, namespace, resource, outcome, own=False)
    except rc.NotOurs as exc:
        kopf.warn(body, reason="Conflict", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=60) from None
    except Exception as exc:  # a bad spec, a refused request, or a bug
        if _transient(exc):
            raise _retry(exc) from None
        status = rc.refused_status(resource, exc)
        patch.status.update(status)
        kopf.warn(body, reason=status["conditions"][0]["reason"], message=status["conditions"][0]["message"])
        _sync_quietly(memo, kube, namespace, name)  # its models say that they wait for the cluster to be fixed
        raise kopf.PermanentError(str(exc)) from None
    if outcome.action != "unchanged":
        kopf.event(body, type="Normal", reason=outcome.action.title(), message=f"RayService {name} {outcome.action}")
    patch.status.update(outcome.status)


@kopf.on.event(*CLUSTERS)
def cluster_event(event: kopf.RawEvent, memo: Any, **given: Any) -> None:
    """A deleted cluster leaves its models waiting for it, each saying so."""
    if event["type"] == "DELETED":
        obj: dict[str, Any] = dict(event["object"])
        meta = obj["metadata"]
        _sync_quietly(memo, _kube(memo, given), meta["namespace"], meta["name"])


@kopf.on.event(*RAYSERVICES, labels={CLUSTER_LABEL: kopf.PRESENT})
def cluster_rayservice_event(event: kopf.RawEvent, memo: Any, **given: Any) -> None:
    """Mirror KubeRay's progress into the cluster and each model's status; put back a RayService changed by hand."""
    obj: dict[str, Any] = dict(event["object"])
    meta = obj["metadata"]
    cluster = (meta.get("labels") or {})[CLUSTER_LABEL]
    _sync_quietly(memo, _kube(memo, given), meta["namespace"], cluster)


@kopf.on.event(*RAYSERVICES, labels={MODEL_LABEL: kopf.PRESENT})
def rayservice_event(
    event: kopf.RawEvent, memo: Any, logger: logging.Logger | logging.LoggerAdapter, **given: Any
) -> None:
    """Mirror KubeRay's progress into the model at once, and put back a RayService deleted or edited by hand."""
    rayservice: dict[str, Any] = dict(event["object"])
    name, namespace = rc.owner_name(rayservice), rayservice["metadata"]["namespace"]
    kube = _kube(memo, given)
    resource = kube.get_model(namespace, name) if name else None
    if resource is None or resource["metadata"].get("deletionTimestamp") or _refused(resource):
        return
    if cluster_ref(resource) is not None:  # the model moved onto a cluster and gave this RayService up
        return
    try:
        spec = rc.check(kube, resource)
        current = None if event["type"] == "DELETED" else rayservice
        if current is None or not rc.contains(current, rc.desired_rayservice(resource, memo.settings)):
            action, _ = rc.apply(kube, resource, memo.settings)
            if action != "unchanged":
                kopf.event(
                    resource,
                    type="Normal",
                    reason="Restored",
                    message=f"RayService {name} {action} after a change by hand",
                )
            current = None
        status = rc.observe(kube, resource, spec, memo.settings, current)
    except Exception as exc:  # the model's own handler reports these (a bad spec, a conflict, a bug)
        logger.warning("Not mirroring RayService %s/%s: %s", namespace, name, exc)
        return
    if cl.changed(resource.get("status") or {}, status):
        kube.patch_model_status(namespace, resource["metadata"]["name"], status)


@kopf.on.event(*MODELS)
def model_event(event: kopf.RawEvent, memo: Any, **given: Any) -> None:
    """When a model goes, its cluster drops its application, and the models it was blocking are retried."""
    if event["type"] != "DELETED":
        return
    deleted: dict[str, Any] = dict(event["object"])
    namespace = deleted["metadata"]["namespace"]
    kube = _kube(memo, given)
    affected = set(cl.holding(kube, namespace, deleted["metadata"]["name"]))
    if (ref := cluster_ref(deleted)) is not None:
        affected.add(ref)
    for cluster in sorted(affected):
        _sync_quietly(memo, kube, namespace, cluster)
    try:
        _retry_refused(kube, namespace)
    except (ApiException, *UNANSWERED) as exc:  # kopf never retries an event handler: say so, the next one does
        logging.getLogger(__name__).warning("Not retrying refused models in %s: %s", namespace, exc)


def _retry_refused(kube: Any, namespace: str) -> None:
    for other in kube.list_models(namespace):
        if _refused(other):
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


def _refused(resource: dict[str, Any]) -> bool:
    """Whether this generation of the model was already refused as invalid (no retry storm)."""
    status = resource.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return ready.get("reason") in REFUSED and status.get("observedGeneration") == resource["metadata"].get("generation")
