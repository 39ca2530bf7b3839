"""One reconciliation of a ZeroCopyCluster: validate, plan its models, build, adopt, apply, observe.

A cluster is reconciled whenever it or one of its models changes, and on
every event of its RayService; each run lists the namespace's models, so
the outcome depends only on what is stored, never on the order of events
(a model created before its cluster is picked up when the cluster appears;
a deleted model's application goes with the next run). The statuses of the
cluster and of every model on it are written here, and only when they changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import yaml
from pydantic.alias_generators import to_camel

from .kube import Kube
from .manifests import build_cluster_rayservice, build_router_application
from .placement import ClusterPlan, Member, cluster_ref, members_of, plan_cluster
from .reconcile import Settings, adopt, apply_desired, now, observe, owns, write_status
from .resources import serve_url
from .status import (
    NOT_SERVING,
    application_status,
    cluster_status,
    find_condition,
    invalid_status,
    model_status,
    waiting_status,
)
from .validation import InvalidSpec, validate_cluster

CLUSTER_NOT_FOUND = "ClusterNotFound"
CLUSTER_INVALID = "ClusterInvalid"


@dataclass(frozen=True)
class ClusterOutcome:
    action: str
    status: dict[str, Any]
    #: The status of each model that names the cluster, by name.
    models: dict[str, dict[str, Any]]


def current_applications(cluster: dict[str, Any], rayservice: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The applications the cluster's RayService serves now, by name (none if it is not the cluster's)."""
    if rayservice is None or not owns(cluster, rayservice):
        return {}
    config = yaml.safe_load(rayservice.get("spec", {}).get("serveConfigV2") or "") or {}
    return {app["name"]: app for app in config.get("applications") or [] if isinstance(app, dict) and "name" in app}


def reconcile_cluster(kube: Kube, resource: dict[str, Any], settings: Settings) -> ClusterOutcome:
    """Apply the cluster's RayService with one application per servable model; the statuses to write.

    Raises InvalidSpec for a bad cluster spec (nothing is applied) and NotOurs for a RayService of the
    cluster's name that something else owns.
    """
    meta = resource["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    spec = validate_cluster(resource)
    current = kube.get_rayservice(namespace, name)  # first: a change after the listing below fails the replace
    models = kube.list_models(namespace)
    plan = plan_cluster(name, spec, models, current_applications(resource, current))
    desired = adopt(resource, build_cluster_rayservice(resource, plan.applications, settings.default_image))
    action, _ = apply_desired(kube, resource, desired, current)
    rayservice = current if action == "unchanged" else kube.get_rayservice(namespace, name)
    statuses = {m.name: member_status(kube, m, settings, rayservice) for m in plan.members}
    entries = [model_entry(m, statuses[m.name], rayservice) for m in plan.members]
    openai = build_router_application(plan.applications) is not None
    url = serve_url(namespace, name)
    status = cluster_status(resource, spec, rayservice, entries, store_use(plan), url, now(), openai)
    return ClusterOutcome(action, status, statuses)


def member_status(kube: Kube, member: Member, settings: Settings, rayservice: dict[str, Any] | None) -> dict[str, Any]:
    """A served model's status from its own application; a refused one's from its problems."""
    resource = member.resource
    if member.spec is None or member.refused:
        message = "; ".join(member.problems)
        if member.application is not None:
            message += "; its previous spec keeps serving until this is fixed"
        generation = resource["metadata"].get("generation")
        previous = (resource.get("status") or {}).get("conditions") or []
        status = invalid_status(message, generation, previous, now())
        # As written, not from the (refused) spec: the model still names its cluster, which may keep serving it.
        served = {} if member.application is not None else NOT_SERVING
        return model_status({**status, "cluster": cluster_ref(resource), **served})
    return observe(kube, resource, member.spec, settings, rayservice)


def model_entry(member: Member, status: dict[str, Any], rayservice: dict[str, Any] | None) -> dict[str, Any]:
    """The model's line in the cluster's status.models."""
    app = application_status(rayservice, member.name)
    served = member.application is not None
    weights = (status.get("weights") or {}).get("bytes") or member.weights_bytes
    ready = find_condition(status, "Ready")
    return {
        "name": member.name,
        "route": member.application["route_prefix"] if served and member.application else None,
        "application": "Refused" if member.refused else app.get("status") or "Deploying",
        "ready": bool(app.get("status") == "RUNNING" and served),
        "weightsBytes": weights,
        "message": ready.get("message", ""),
    }


def store_use(plan: ClusterPlan) -> list[dict[str, Any]]:
    return [{to_camel(k): v for k, v in asdict(use).items()} for use in plan.store]


def sync_cluster(kube: Kube, namespace: str, name: str, settings: Settings) -> ClusterOutcome | None:
    """Reconcile cluster `name` for its models' sake and write every status; None if it is missing or invalid.

    A missing or invalid cluster leaves its models waiting, each with a condition saying why; the cluster's
    own handler reports an invalid cluster's problems on the cluster.
    """
    cluster = kube.get_cluster(namespace, name)
    if cluster is None or cluster["metadata"].get("deletionTimestamp"):
        message = (
            f"ZeroCopyCluster {name} does not exist in namespace {namespace}: create it, or remove spec.clusterRef "
            "to give the model a cluster of its own; the model is served as soon as the cluster exists"
        )
        _wait(kube, namespace, name, CLUSTER_NOT_FOUND, message)
        return None
    try:
        outcome = reconcile_cluster(kube, cluster, settings)
    except InvalidSpec as exc:
        message = f"ZeroCopyCluster {name} is invalid ({exc}); the model is served once the cluster is fixed"
        _wait(kube, namespace, name, CLUSTER_INVALID, message)
        return None
    write(kube, namespace, cluster, outcome)
    return outcome


def write(kube: Kube, namespace: str, cluster: dict[str, Any], outcome: ClusterOutcome) -> None:
    """Write the statuses that changed: every model's, then the cluster's."""
    models = {m["metadata"]["name"]: m for m in kube.list_models(namespace)}
    for name, status in outcome.models.items():
        if name in models:
            write_status(kube, models[name], status)
    write_status(kube, cluster, outcome.status)


def _wait(kube: Kube, namespace: str, cluster: str, reason: str, message: str) -> None:
    for model in members_of(cluster, kube.list_models(namespace)):
        write_status(kube, model, waiting_status(model, reason, message, now()))


def holding(kube: Kube, namespace: str, model: str) -> list[str]:
    """The clusters whose status lists `model`: those to reconcile when it moves away or goes."""
    return [
        c["metadata"]["name"]
        for c in kube.list_clusters(namespace)
        if any(m.get("name") == model for m in (c.get("status") or {}).get("models") or [])
    ]
