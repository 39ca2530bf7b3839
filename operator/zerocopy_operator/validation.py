"""Checks a schema cannot express: they compare fields with each other and with other resources.

Each problem is one sentence naming the field, the numbers, and the fix, so
that a condition message or `zerocopy validate` output is enough to act on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from . import quantity
from .api import (
    API_VERSION,
    CLUSTER_KIND,
    KIND,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    Cluster,
    ZeroCopyClusterSpec,
    ZeroCopyModelSpec,
)
from .resources import largest_worker, parse_cluster_spec, parse_spec, route_prefix


class InvalidSpec(ValueError):
    """A ZeroCopyModel the operator cannot serve as written; retrying will not help."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def validate(
    resource: dict[str, Any],
    others: Sequence[dict[str, Any]] = (),
    known_bytes: int | None = None,
    cluster: Cluster | None = None,
) -> ZeroCopyModelSpec:
    """The typed spec of a servable resource, or InvalidSpec listing every problem.

    `others` are the other ZeroCopyModels of the namespace (for route
    collisions); `known_bytes` is the size the runtime reported last time;
    `cluster` is the ZeroCopyCluster's spec for a model with a clusterRef
    (None: its fit is checked when its cluster is planned, see `placement`).
    """
    _check_kind(resource, KIND)
    name_problems = name_problem(resource)
    if not isinstance(resource.get("spec"), dict):
        raise InvalidSpec([*name_problems, "spec: must be a mapping with at least spec.model"])
    try:
        spec = parse_spec(resource)
    except ValidationError as exc:
        raise InvalidSpec([*name_problems, *(_field_error(error) for error in exc.errors())]) from None
    if name_problems:
        raise InvalidSpec(name_problems)
    problems = semantic_problems(
        resource, spec, others, known_bytes, spec.cluster if spec.cluster_ref is None else cluster
    )
    if problems:
        raise InvalidSpec(problems)
    return spec


def validate_cluster(resource: dict[str, Any]) -> ZeroCopyClusterSpec:
    """The typed spec of a ZeroCopyCluster, or InvalidSpec listing every problem."""
    _check_kind(resource, CLUSTER_KIND)
    problems = name_problem(resource, "the cluster's")
    if not isinstance(resource.get("spec"), dict):
        raise InvalidSpec([*problems, "spec: must be a mapping (an empty one, {}, gives one GPU worker group)"])
    try:
        spec = parse_cluster_spec(resource)
    except ValidationError as exc:
        problems += [_field_error(error) for error in exc.errors()]
    if problems:
        raise InvalidSpec(problems)
    return spec


def _check_kind(resource: dict[str, Any], kind: str) -> None:
    if resource.get("apiVersion") != API_VERSION or resource.get("kind") != kind:
        raise InvalidSpec(
            [f"expected apiVersion {API_VERSION} and kind {kind}, got {resource.get('apiVersion')!r} / "
             f"{resource.get('kind')!r}"]
        )  # fmt: skip


def name_problem(resource: dict[str, Any], whose: str = "the model's") -> list[str]:
    """metadata.name as KubeRay and Serve take it: a DNS label of at most MAX_NAME_LENGTH characters."""
    name = (resource.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        return ["metadata.name: required (a lower-case DNS label such as my-model)"]
    if len(name) > MAX_NAME_LENGTH:
        return [
            f"metadata.name {name!r} has {len(name)} characters, more than {MAX_NAME_LENGTH}: KubeRay refuses "
            f"longer RayService names ({whose} RayService takes its name); choose a shorter name"
        ]
    if not re.match(NAME_PATTERN, name):
        return [
            f"metadata.name {name!r} must start with a letter and hold only lower-case letters, digits and '-' "
            "(KubeRay requires a DNS-1035 label of RayService names)"
        ]
    return []


def _age_key(resource: dict[str, Any]) -> tuple[str, str]:
    meta = resource["metadata"]
    return meta.get("creationTimestamp") or "", meta["name"]


def _field_error(error: Any) -> str:
    """`spec.serving.replicas: Input should be greater than or equal to 1`, in the resource's camelCase."""
    where = "spec" + "".join(f"[{part}]" if isinstance(part, int) else f".{to_camel(part)}" for part in error["loc"])
    return f"{where}: {error['msg'].removeprefix('Value error, ')}"


def semantic_problems(
    resource: dict[str, Any],
    spec: ZeroCopyModelSpec,
    others: Sequence[dict[str, Any]],
    known_bytes: int | None,
    cluster: Cluster | None,
) -> list[str]:
    problems = [] if cluster is None else fit_problems(spec, cluster, known_bytes, _where(spec))
    problems += route_problems(resource, spec, others)
    return problems


def _where(spec: ZeroCopyModelSpec) -> str:
    return "" if spec.cluster_ref is None else f" of ZeroCopyCluster {spec.cluster_ref.name}"


def fit_problems(spec: ZeroCopyModelSpec, cluster: Cluster, known_bytes: int | None, where: str) -> list[str]:
    """Whether one replica fits a worker pod of `cluster`: its GPUs, its CPUs, and the weights in the object store."""
    problems = []
    gpus, cpus, store = largest_worker(cluster)
    serving = spec.serving
    if serving.gpus_per_replica > gpus:
        problems.append(
            f"serving.gpusPerReplica is {serving.gpus_per_replica:g} but no worker group{where} has more than {gpus} "
            "GPUs per pod: add GPUs to a worker group or lower gpusPerReplica"
        )
    if serving.cpus_per_replica > cpus:
        problems.append(
            f"serving.cpusPerReplica is {serving.cpus_per_replica:g} but no worker group{where} has more than "
            f"{cpus:g} CPUs per pod: raise a worker group's cpu or lower cpusPerReplica"
        )
    size = model_bytes(spec, known_bytes)
    if size is not None and size > store:
        problems.append(
            f"the model's weights take {quantity.memory(size)} but the largest worker object store{where} is "
            f"{quantity.memory(store)}: raise objectStoreMemory of a worker group (and its memory) above the model size"
        )
    return problems


def model_bytes(spec: ZeroCopyModelSpec, known_bytes: int | None) -> int | None:
    """The weights' size: the larger of what the spec states and what the replicas last reported (a cast or a
    dequantized file publishes more than the file it comes from), else unknown."""
    sizes = [quantity.to_bytes(spec.model.size) if spec.model.size is not None else None, known_bytes]
    known = [size for size in sizes if size is not None]
    return max(known) if known else None


#: Each model's route by (uid, generation): a generation names one spec, so its route is parsed once, not in
#: every other model's reconcile (that made the operator's work grow with the square of the models).
_ROUTES: dict[tuple[str, int], str | None] = {}
_ROUTES_KEPT = 20_000


def _route_of(resource: dict[str, Any]) -> str | None:
    """The route prefix a valid model serves at; None for an invalid spec."""
    meta = resource.get("metadata") or {}
    uid, generation = meta.get("uid"), meta.get("generation")
    key = (str(uid), int(generation)) if uid is not None and generation is not None else None
    if key is not None and key in _ROUTES:
        return _ROUTES[key]
    try:
        route: str | None = route_prefix(resource, parse_spec(resource))
    except ValidationError:
        route = None
    if key is not None:
        if len(_ROUTES) >= _ROUTES_KEPT:
            _ROUTES.clear()
        _ROUTES[key] = route
    return route


def route_problems(resource: dict[str, Any], spec: ZeroCopyModelSpec, others: Sequence[dict[str, Any]]) -> list[str]:
    """Route prefixes are unique in a namespace (so on every shared cluster): the older model keeps its route."""
    problems = []
    mine = route_prefix(resource, spec)
    for other in others:
        if _age_key(other) >= _age_key(resource):
            continue  # the older resource keeps its route; only the newcomer is refused
        theirs = _route_of(other)
        if theirs is None:
            continue  # the other resource has its own condition to say what is wrong with it
        if theirs == mine:
            problems.append(
                f"route prefix {mine} is already used by ZeroCopyModel {other['metadata']['name']} in this "
                "namespace: set a different serving.routePrefix"
            )
    return problems
