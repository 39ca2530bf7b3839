"""One reconciliation of a ZeroCopyModel: validate, build, adopt, apply, observe.

Handlers call these functions and only translate their outcome into kopf's
terms (PermanentError, TemporaryError, Events). Every step is idempotent: it
can run again after an operator restart without creating anything twice.
"""

from __future__ import annotations

import datetime
import json
import logging
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from zerocopy_runtime.contract import ReplicaInfo

from .api import ZeroCopyModelSpec
from .kube import Kube
from .manifests import MODEL_LABEL, build_rayservice
from .resources import endpoint, route_prefix, service_name
from .status import (
    OPERATOR_ERROR,
    REFUSED,
    find_condition,
    invalid_status,
    observed_status,
    weights_from_info,
    with_adapters,
)
from .validation import InvalidSpec, validate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """What the operator is told at start-up (flags or environment; see the CLI)."""

    default_image: str
    #: Where a model's /-/info is read from; a test seam as much as a setting (a proxy, a port-forward).
    info_url: str = "{endpoint}/-/info"
    info_timeout_s: float = 2.0
    #: The RayService builder: a test seam, so that a test can make it fail as a bug would.
    build: Callable[[dict[str, Any], str], dict[str, Any]] = build_rayservice


class NotOurs(Exception):
    """A RayService with the resource's name exists and belongs to something else."""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check(kube: Kube, resource: dict[str, Any]) -> ZeroCopyModelSpec:
    """The spec, validated against the schema, its own cluster's shape and the namespace's other models.

    A model with a clusterRef is checked against its cluster's shape and the models beside it when that
    cluster is planned (`clusters.reconcile_cluster`).
    """
    meta = resource["metadata"]
    known = ((resource.get("status") or {}).get("weights") or {}).get("bytes")
    return validate(resource, kube.list_models(meta["namespace"]), known_bytes=known)


def refused_status(resource: dict[str, Any], error: Exception) -> dict[str, Any]:
    """Failed with InvalidSpec for a bad spec; with OperatorError, naming the exception, for anything unexpected."""
    previous = (resource.get("status") or {}).get("conditions") or []
    generation = resource["metadata"].get("generation")
    if isinstance(error, InvalidSpec):
        return invalid_status(str(error), generation, previous, now())
    if isinstance(error, ApiException):  # a request the API server refused as such (400, 422): say what it said
        error = RuntimeError(f"the Kubernetes API refused the request with {error.status}: {api_message(error)}")
    message = (
        f"the operator failed on this spec ({type(error).__name__}: {error}); nothing was changed and it will not "
        "retry until the spec changes. This is a bug in zerocopy-operator: please report it with this message"
    )
    return invalid_status(message, generation, previous, now(), reason=OPERATOR_ERROR)


def api_message(error: ApiException) -> str:
    """The `message` of the API server's `kind: Status` answer (its body), or its reason where there is none."""
    try:
        return str(json.loads(error.body or "").get("message") or error.reason)
    except (ValueError, AttributeError):
        return str(error.reason)


def desired_rayservice(resource: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A model's own RayService, adopted."""
    return adopt(resource, settings.build(resource, settings.default_image))


def adopt(owner: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """`body` in the owner's namespace, owned by it (deleted with it by the cluster's garbage collector)."""
    meta = owner["metadata"]
    body["metadata"]["namespace"] = meta["namespace"]
    body["metadata"]["ownerReferences"] = [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    return body


def apply(kube: Kube, resource: dict[str, Any], settings: Settings) -> tuple[str, dict[str, Any]]:
    """Create the model's RayService, or put back what drifted from the desired one. Returns what it did."""
    meta = resource["metadata"]
    current = kube.get_rayservice(meta["namespace"], meta["name"])
    return apply_desired(kube, resource, desired_rayservice(resource, settings), current)


def owns(owner: dict[str, Any], rayservice: dict[str, Any]) -> bool:
    return any(o.get("uid") == owner["metadata"]["uid"] for o in rayservice["metadata"].get("ownerReferences") or [])


def apply_desired(
    kube: Kube, owner: dict[str, Any], desired: dict[str, Any], current: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """Create `desired`, or put back what drifted from it in `current`, the owner's RayService as read before
    `desired` was planned: its resourceVersion makes a concurrent change fail (409, retried), never lost."""
    meta = owner["metadata"]
    if current is None:
        kube.create_rayservice(meta["namespace"], desired)
        return "created", desired
    if not owns(owner, current):
        raise NotOurs(
            f"RayService {meta['name']} already exists and is not owned by this {owner['kind']}: "
            f"delete it or rename the {owner['kind']}"
        )
    if contains(current, desired):
        return "unchanged", current
    merged = {**desired, "metadata": {**current["metadata"], **desired["metadata"]}}
    merged["metadata"]["labels"] = {**(current["metadata"].get("labels") or {}), **desired["metadata"]["labels"]}
    kube.replace_rayservice(meta["namespace"], merged)
    return "updated", merged


def contains(actual: Any, wanted: Any) -> bool:
    """Whether `actual` has every field of `wanted` with the same value (fields the API server or
    KubeRay add as defaults are not drift)."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(contains(actual.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(contains(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    return bool(actual == wanted)


def observe(
    kube: Kube, resource: dict[str, Any], spec: ZeroCopyModelSpec, settings: Settings, rayservice: Any = None
) -> dict[str, Any]:
    """The status to write, from the RayService (fetched unless given) and, once serving, /-/info."""
    meta = resource["metadata"]
    if rayservice is None:
        rayservice = kube.get_rayservice(meta["namespace"], service_name(resource, spec))
    url = endpoint(resource, spec)
    weights = (resource.get("status") or {}).get("weights")
    status = observed_status(resource, spec, rayservice, weights, url, now())
    if status["phase"] in ("Ready", "Upgrading"):
        info = read_info(settings, resource, spec, url)
        if info is not None:
            status = observed_status(resource, spec, rayservice, weights_from_info(info), url, now())
            status = with_adapters(status, resource, spec, info, now())
    return status


def read_info(settings: Settings, resource: dict[str, Any], spec: ZeroCopyModelSpec, url: str) -> ReplicaInfo | None:
    """The replicas' /-/info, or None while it cannot be reached or read as the runtime's contract (a replica
    of another version): the status keeps what it had."""
    meta = resource["metadata"]
    target = settings.info_url.format(
        endpoint=url, name=meta["name"], namespace=meta["namespace"], route=route_prefix(resource, spec)
    )
    try:
        with urllib.request.urlopen(target, timeout=settings.info_timeout_s) as response:
            return ReplicaInfo.model_validate_json(response.read())
    except ValidationError as exc:
        logger.warning("%s answered /-/info outside the runtime's contract: %s", target, exc)
        return None
    except (OSError, ValueError):
        return None


def mirror(kube: Kube, namespace: str, name: str, settings: Settings) -> str | None:
    """A standalone model's RayService put back if it was deleted or edited by hand, and KubeRay's progress
    written into the model's status; what was done to the RayService (None: not this function's model).

    Level-triggered: reads the model and its RayService as they are now, whatever event asked for it. A model
    on a cluster is its cluster's to reconcile; a refused or deleted one is left alone.
    """
    resource = kube.get_model(namespace, name)
    if resource is None or resource["metadata"].get("deletionTimestamp") or refused(resource):
        return None
    if (resource.get("spec") or {}).get("clusterRef"):  # the model moved onto a cluster and gave its own up
        return None
    spec = check(kube, resource)
    action, _ = apply(kube, resource, settings)
    if action != "unchanged":
        message = f"RayService {name} {action} after a change by hand"
        kube.post_event(resource, "Normal", "Restored", message, now())
    status = observe(kube, resource, spec, settings)
    failed = _condition(status, "AdaptersReady")
    if failed.get("status") == "False" and failed != _condition(resource.get("status") or {}, "AdaptersReady"):
        kube.post_event(resource, "Warning", "AdapterFailed", failed["message"], now())
    write_status(kube, resource, status)
    return action


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    """A condition without its timestamps (what changed, not when)."""
    found = find_condition(status, kind)
    return {k: v for k, v in found.items() if k not in ("lastTransitionTime", "observedGeneration")}


def write_status(kube: Kube, resource: dict[str, Any], status: dict[str, Any]) -> bool:
    """The one way a status is written: a merge patch of `status` onto the resource's, only when it changes
    more than conditions' timestamps. Whether it wrote."""
    if not changed(resource.get("status") or {}, status):
        return False
    meta = resource["metadata"]
    patch = kube.patch_cluster_status if resource.get("kind") == "ZeroCopyCluster" else kube.patch_model_status
    patch(meta["namespace"], meta["name"], status)
    return True


def changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether patching `new` (a merge patch: the keys it names) would change more than conditions' timestamps."""

    def plain(status: dict[str, Any], key: str) -> Any:
        if key == "conditions":
            return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get(key) or []]
        return status.get(key)  # a merge patch deletes what it sets to null: absent and None are the same

    return any(plain(old, key) != plain(new, key) for key in new)


def refused(resource: dict[str, Any]) -> bool:
    """Whether this generation of the model was already refused as invalid (no retry storm)."""
    status = resource.get("status") or {}
    ready = find_condition(status, "Ready")
    return ready.get("reason") in REFUSED and status.get("observedGeneration") == resource["metadata"].get("generation")


def owner_name(rayservice: dict[str, Any]) -> str | None:
    """The ZeroCopyModel a RayService was made for, from the label the builder sets."""
    return (rayservice.get("metadata", {}).get("labels") or {}).get(MODEL_LABEL)
