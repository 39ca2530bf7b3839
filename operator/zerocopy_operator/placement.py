"""Which models a ZeroCopyCluster serves: the checks across models, as one pure plan.

A model that names a cluster is checked alone (its schema, its route among
the namespace's models, each replica against the cluster's worker pods),
then against the models already placed there: the weights of every model
whose replicas may land on a worker group must fit that group's object
store together. Models are placed oldest first, so a newcomer is refused
rather than an established model evicted. A refused model that was being
served keeps its previous application (nothing is half-applied), exactly
as a model with its own cluster keeps its RayService when an edit is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zerocopy_runtime.contract import ROUTER_APP, router_route

from . import quantity
from .api import ZeroCopyClusterSpec, ZeroCopyModelSpec
from .manifests import build_serve_application
from .resources import route_prefix
from .validation import InvalidSpec, model_bytes, validate


@dataclass(frozen=True)
class Member:
    """One model that names the cluster, and what the plan decided for it."""

    resource: dict[str, Any]
    spec: ZeroCopyModelSpec | None
    problems: list[str]
    #: What serveConfigV2 holds for it: its new application, the previous one (refused, kept), or None.
    application: dict[str, Any] | None
    weights_bytes: int | None

    @property
    def name(self) -> str:
        return str(self.resource["metadata"]["name"])

    @property
    def refused(self) -> bool:
        return bool(self.problems)


@dataclass(frozen=True)
class GroupUse:
    """A worker group's per-pod object store, and the models whose weights may be published there."""

    group: str
    capacity_bytes: int
    weights_bytes: int = 0
    models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClusterPlan:
    members: list[Member]
    store: list[GroupUse]

    @property
    def applications(self) -> list[dict[str, Any]]:
        return [m.application for m in self.members if m.application is not None]


def members_of(cluster: str, models: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The models that name `cluster` (and are not being deleted), oldest first."""
    named = [m for m in models if cluster_ref(m) == cluster and not m.get("metadata", {}).get("deletionTimestamp")]
    return sorted(named, key=lambda m: (m["metadata"].get("creationTimestamp") or "", m["metadata"]["name"]))


def cluster_ref(resource: dict[str, Any]) -> str | None:
    """spec.clusterRef.name as written, read without validating (a broken model still names its cluster)."""
    spec = resource.get("spec")
    ref = spec.get("clusterRef") if isinstance(spec, dict) else None
    name = ref.get("name") if isinstance(ref, dict) else None
    return name if isinstance(name, str) else None


def plan_cluster(
    name: str,
    spec: ZeroCopyClusterSpec,
    models: Sequence[dict[str, Any]],
    current: dict[str, dict[str, Any]],
) -> ClusterPlan:
    """Place the namespace's `models` that name cluster `name`; `current`: the applications it serves now.

    What Serve keeps serving as it is (an unchanged application, or a refused model's previous one) takes
    its room first; then changed and new models, oldest first, each checked against what is left. So an
    edit that grows a model is refused, never the unchanged model beside it.
    """
    store = {g.name: GroupUse(g.name, quantity.to_bytes(g.object_store_memory)) for g in spec.worker_groups}
    secrets = {s.name for s in spec.credentials_secrets}
    drafts = [_draft(resource, models, spec, current) for resource in members_of(name, models)]
    decided: dict[str, Member] = {}
    for draft in sorted(drafts, key=lambda d: not d.stays):  # stable: oldest first within each pass
        problems = list(draft.problems)
        if draft.model is not None and not problems:
            served_elsewhere = {
                str(app["route_prefix"]): other
                for other, app in current.items()
                if other not in (draft.name, ROUTER_APP)
            }  # a route another application serves now stays taken until that one has moved
            route = draft.application["route_prefix"] if draft.application else None
            if route is not None and router_route(route):
                problems.append(
                    f"route prefix {route} is the OpenAI endpoint of ZeroCopyCluster {name} (it routes / and "
                    "/v1 to every model by the request's model field): set another serving.routePrefix"
                )
            elif route in served_elsewhere:
                problems.append(
                    f"route prefix {route} is served now by ZeroCopyModel {served_elsewhere[route]}'s application on "
                    f"ZeroCopyCluster {name}: set a different serving.routePrefix (or wait until that model's new "
                    "route is deployed)"
                )
            problems += _secret_problems(name, draft.model, secrets)
            problems += _room_problems(name, spec, draft.model, draft.size, store)
        kept = bool(problems)
        application = current.get(draft.name) if kept else draft.application  # kept while refused
        # A kept application holds the weights its replicas reported, not those of the refused edit.
        size = (draft.reported if draft.reported is not None else draft.size) if kept else draft.size
        if application is not None:
            _occupy(store, spec, draft.model, draft.name, size)
        decided[draft.name] = Member(draft.resource, draft.model, problems, application, size)
    return ClusterPlan([decided[d.name] for d in drafts], list(store.values()))


@dataclass(frozen=True)
class _Draft:
    """A member before placement: its validated spec (or problems), and the application it would get."""

    resource: dict[str, Any]
    model: ZeroCopyModelSpec | None
    problems: list[str]
    application: dict[str, Any] | None
    size: int | None
    #: The size its replicas last reported (status.weights.bytes).
    reported: int | None
    #: Serve keeps serving it as it is: its application is unchanged, or it is refused and keeps the one it had.
    stays: bool

    @property
    def name(self) -> str:
        return str(self.resource["metadata"]["name"])


def _draft(
    resource: dict[str, Any],
    models: Sequence[dict[str, Any]],
    spec: ZeroCopyClusterSpec,
    current: dict[str, dict[str, Any]],
) -> _Draft:
    name = resource["metadata"]["name"]
    known = ((resource.get("status") or {}).get("weights") or {}).get("bytes")
    try:
        model = validate(resource, models, known_bytes=known, cluster=spec)
    except InvalidSpec as exc:
        return _Draft(resource, None, list(exc.problems), None, known, known, name in current)
    application = build_serve_application(name, model, route_prefix(resource, model))
    size = model_bytes(model, known)
    return _Draft(resource, model, [], application, size, known, current.get(name) == application)


def _landing_groups(spec: ZeroCopyClusterSpec, model: ZeroCopyModelSpec | None) -> list[str]:
    """The worker groups a replica may be scheduled on: every group with its GPUs and CPUs (all, if unknown)."""
    if model is None:
        return [g.name for g in spec.worker_groups]
    serving = model.serving
    return [
        g.name
        for g in spec.worker_groups
        if g.gpus >= serving.gpus_per_replica and float(quantity.parse(g.cpu)) >= serving.cpus_per_replica
    ]


def _occupy(
    store: dict[str, GroupUse], spec: ZeroCopyClusterSpec, model: ZeroCopyModelSpec | None, name: str, size: int | None
) -> None:
    for group in _landing_groups(spec, model):
        use = store[group]
        store[group] = GroupUse(use.group, use.capacity_bytes, use.weights_bytes + (size or 0), [*use.models, name])


def _room_problems(
    cluster: str,
    spec: ZeroCopyClusterSpec,
    model: ZeroCopyModelSpec,
    size: int | None,
    store: dict[str, GroupUse],
) -> list[str]:
    """Each group a replica may land on must hold this model's weights beside those already placed there."""
    groups = _landing_groups(spec, model)
    if not groups:
        return [
            f"no worker group of ZeroCopyCluster {cluster} has both {model.serving.gpus_per_replica:g} GPUs and "
            f"{model.serving.cpus_per_replica:g} CPUs per pod for a replica: give one group both, or lower "
            "serving.gpusPerReplica or cpusPerReplica"
        ]
    if size is None:
        return []  # unknown until a replica reports it; set model.size to have it checked before deploying
    problems = []
    for group in groups:
        use = store[group]
        if use.weights_bytes + size > use.capacity_bytes:
            there = (
                f"the models already there ({', '.join(use.models)}) take {quantity.human(use.weights_bytes)}, and "
                f"this model's {quantity.human(size)} would make {quantity.human(use.weights_bytes + size)}"
                if use.models
                else f"less than this model's {quantity.human(size)}"
            )
            problems.append(
                f"the weights would not fit worker group {group} of ZeroCopyCluster {cluster}: its object store "
                f"holds {quantity.human(use.capacity_bytes)} per pod, {there}: raise objectStoreMemory of worker "
                f"group {group} (and its memory), remove a model from the cluster, or give this model a cluster of "
                "its own"
            )
    return problems


def _secret_problems(cluster: str, model: ZeroCopyModelSpec, secrets: set[str]) -> list[str]:
    secret = model.model.credentials_secret
    if secret is None or secret.name in secrets:
        return []
    return [
        f"model.credentialsSecret {secret.name} is not among ZeroCopyCluster {cluster}'s credentialsSecrets: add it "
        "there (the cluster's pods are shared, so the cluster holds the credentials of every model on it)"
    ]
