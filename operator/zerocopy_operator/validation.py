"""Checks a schema cannot express: they compare fields with each other and with other resources.

Each problem is one sentence naming the field, the numbers, and the fix, so
that a condition message or `zerocopy validate` output is enough to act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from . import quantity
from .api import API_VERSION, KIND, ZeroCopyModelSpec
from .manifests import largest_worker, parse_spec, route_prefix


class InvalidSpec(ValueError):
    """A ZeroCopyModel the operator cannot serve as written; retrying will not help."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def validate(
    resource: dict[str, Any], others: Sequence[dict[str, Any]] = (), known_bytes: int | None = None
) -> ZeroCopyModelSpec:
    """The typed spec of a servable resource, or InvalidSpec listing every problem.

    `others` are the other ZeroCopyModels of the namespace (for route
    collisions); `known_bytes` is the size the runtime reported last time.
    """
    if resource.get("apiVersion") != API_VERSION or resource.get("kind") != KIND:
        raise InvalidSpec([f"expected apiVersion {API_VERSION} and kind {KIND}"])
    try:
        spec = parse_spec(resource)
    except ValidationError as exc:
        raise InvalidSpec([_field_error(error) for error in exc.errors()]) from None
    problems = semantic_problems(resource, spec, others, known_bytes)
    if problems:
        raise InvalidSpec(problems)
    return spec


def _age_key(resource: dict[str, Any]) -> tuple[str, str]:
    meta = resource["metadata"]
    return meta.get("creationTimestamp") or "", meta["name"]


def _field_error(error: Any) -> str:
    where = "spec." + ".".join(str(part) for part in error["loc"]) if error["loc"] else "spec"
    return f"{where}: {error['msg']}"


def semantic_problems(
    resource: dict[str, Any], spec: ZeroCopyModelSpec, others: Sequence[dict[str, Any]], known_bytes: int | None
) -> list[str]:
    problems = []
    gpus, cpus, store = largest_worker(spec.cluster)
    serving = spec.serving
    if serving.gpus_per_replica > gpus:
        problems.append(
            f"serving.gpusPerReplica is {serving.gpus_per_replica:g} but no worker group has more than {gpus} "
            "GPUs per pod: add GPUs to a worker group or lower gpusPerReplica"
        )
    if serving.cpus_per_replica > cpus:
        problems.append(
            f"serving.cpusPerReplica is {serving.cpus_per_replica:g} but no worker group has more than {cpus:g} "
            "CPUs per pod: raise a worker group's cpu or lower cpusPerReplica"
        )
    size = quantity.to_bytes(spec.model.size) if spec.model.size is not None else known_bytes
    if size is not None and size > store:
        problems.append(
            f"the model's weights take {quantity.memory(size)} but the largest worker object store is "
            f"{quantity.memory(store)}: raise objectStoreMemory of a worker group (and its memory) above the model size"
        )
    mine = route_prefix(resource, spec)
    for other in others:
        if _age_key(other) >= _age_key(resource):
            continue  # the older resource keeps its route; only the newcomer is refused
        try:
            theirs = route_prefix(other, parse_spec(other))
        except ValidationError:
            continue  # the other resource has its own condition to say what is wrong with it
        if theirs == mine:
            problems.append(
                f"route prefix {mine} is already used by ZeroCopyModel {other['metadata']['name']} in this "
                "namespace: set a different serving.routePrefix"
            )
    return problems
