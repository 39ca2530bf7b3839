"""Pure functions from what the operator observed to a ZeroCopyModel's status.

Conditions follow the Kubernetes convention: `Ready` first (the one a person
or Argo CD looks at), then `ClusterReady`, `WeightsPublished` and
`ServeReady`, each with a reason and a message. A condition keeps its
lastTransitionTime while its status stays the same.
"""

from __future__ import annotations

from typing import Any

from zerocopy_runtime.contract import ReplicaInfo

from . import quantity
from .api import ZeroCopyClusterSpec, ZeroCopyClusterStatus, ZeroCopyModelSpec, ZeroCopyModelStatus
from .manifests import DEPLOYMENT
from .resources import service_name

CONDITIONS = ("Ready", "ClusterReady", "WeightsPublished", "ServeReady", "AdaptersReady")
#: What a status says of a model that nothing serves (a merge patch's nulls delete what it showed before).
NOT_SERVING: dict[str, Any] = {
    "rayService": None, "endpoint": None, "openaiBaseUrl": None, "weights": None, "replicas": None, "readyReplicas": 0,
}  # fmt: skip
INVALID_SPEC = "InvalidSpec"
#: An unexpected failure (a bug) on this generation: reported like a bad spec, never retried in a loop.
OPERATOR_ERROR = "OperatorError"
#: Reasons of a Ready=False that hold until the spec changes.
REFUSED = (INVALID_SPEC, OPERATOR_ERROR)


def find_condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    """The condition of type `kind` in a status (ours or a RayService's); empty when it has none."""
    found: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == kind), {})
    return found


def condition(kind: str, ok: bool | None, reason: str, message: str = "") -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return {"type": kind, "status": status, "reason": reason, "message": message}


def invalid_status(
    message: str, generation: int | None, previous: list[dict[str, Any]], now: str, reason: str = INVALID_SPEC
) -> dict[str, Any]:
    """The status of a resource the operator refuses: Failed, with the problems in Ready's message."""
    conditions = [condition("Ready", False, reason, message)]
    return model_status(
        {
            "observedGeneration": generation,
            "phase": "Failed",
            "conditions": stamp(conditions, previous, now, generation),
        }
    )


def observed_status(
    resource: dict[str, Any],
    spec: ZeroCopyModelSpec,
    rayservice: dict[str, Any] | None,
    weights: dict[str, Any] | None,
    endpoint: str,
    now: str,
) -> dict[str, Any]:
    """Status mirrored from the RayService KubeRay runs and the replicas' /-/info."""
    meta = resource["metadata"]
    previous = (resource.get("status") or {}).get("conditions") or []
    desired = _desired_replicas(spec)
    if rayservice is None:
        conditions = [
            condition("Ready", False, "RayServiceMissing", f"creating RayService {service_name(resource, spec)}"),
            condition("ClusterReady", False, "RayServiceMissing"),
            condition("WeightsPublished", None, "NotServing"),
            condition("ServeReady", False, "RayServiceMissing"),
        ]
        return _status(meta, spec, "Pending", conditions, previous, now, None, None, 0, desired)
    state = rayservice.get("status") or {}
    by_type = {c.get("type"): c for c in state.get("conditions") or []}
    app = application_status(rayservice, meta["name"])
    deployment = (app.get("serveDeploymentStatuses") or {}).get(DEPLOYMENT) or {}
    cluster = cluster_condition(rayservice)
    cluster_ok = cluster["status"] == "True"
    app_status = app.get("status", "")
    serve_ok = app_status == "RUNNING"
    failed = app_status in ("DEPLOY_FAILED", "UNHEALTHY")
    serve_message = deployment.get("message") or app.get("message") or ""
    serve = condition("ServeReady", serve_ok, app_status.title().replace("_", "") or "NotDeployed", serve_message)
    published = condition(
        "WeightsPublished",
        True if weights else (False if failed else None),
        "Published" if weights else ("DeployFailed" if failed else "Waiting"),
        _weights_message(weights) if weights else "",
    )
    upgrading = (by_type.get("UpgradeInProgress") or {}).get("status") == "True"
    ready = cluster_ok and serve_ok
    if ready:
        summary = condition("Ready", True, "Serving", f"serving at {endpoint}")
    elif failed:
        summary = condition("Ready", False, "ServeFailed", serve_message or f"application status {app_status}")
    else:
        summary = condition("Ready", False, "Provisioning", cluster["message"] or serve_message or "deploying")
    phase = "Failed" if failed else "Upgrading" if upgrading else "Ready" if ready else "Provisioning"
    ready_replicas = desired if deployment.get("status") == "HEALTHY" else 0
    conditions = [summary, cluster, published, serve]
    return _status(meta, spec, phase, conditions, previous, now, endpoint, weights, ready_replicas, desired)


def application_status(rayservice: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """What KubeRay reports of one Serve application of the RayService (empty until it reports it)."""
    state = (rayservice or {}).get("status") or {}
    found: dict[str, Any] = ((state.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).get(name) or {}
    return found


def cluster_condition(rayservice: dict[str, Any]) -> dict[str, Any]:
    """ClusterReady, from the RayService's Ready condition or its cluster's state."""
    state = rayservice.get("status") or {}
    ready = find_condition(state, "Ready")
    ok = (
        ready.get("status") == "True"
        or ((state.get("activeServiceStatus") or {}).get("rayClusterStatus") or {}).get("state") == "ready"
    )
    message = "" if ok else ready.get("message", "KubeRay is starting the Ray cluster")
    return condition("ClusterReady", ok, "ClusterReady" if ok else "ClusterStarting", message)


def waiting_status(resource: dict[str, Any], reason: str, message: str, now: str) -> dict[str, Any]:
    """A model whose ZeroCopyCluster is missing or invalid: Pending, picked up when the cluster is fixed."""
    meta = resource["metadata"]
    previous = (resource.get("status") or {}).get("conditions") or []
    conditions = [condition("Ready", False, reason, message), condition("ClusterReady", False, reason, message)]
    return model_status(
        {
            "observedGeneration": meta.get("generation"),
            "phase": "Pending",
            "conditions": stamp(conditions, previous, now, meta.get("generation")),
            "cluster": ((resource.get("spec") or {}).get("clusterRef") or {}).get("name"),
            **NOT_SERVING,
        }
    )


def _desired_replicas(spec: ZeroCopyModelSpec) -> int:
    if spec.serving.autoscaling is not None:
        return spec.serving.autoscaling.min_replicas
    return 1 if spec.serving.replicas is None else spec.serving.replicas


def _weights_message(weights: dict[str, Any]) -> str:
    mib = (weights.get("bytes") or 0) / 2**20
    shared = "shared zero-copy" if weights.get("shared") else "NOT shared"
    return f"{mib:.1f} MiB in {weights.get('tensors')} tensors, revision {weights.get('revision')}, {shared}"


def _status(
    meta: dict[str, Any],
    spec: ZeroCopyModelSpec,
    phase: str,
    conditions: list[dict[str, Any]],
    previous: list[dict[str, Any]],
    now: str,
    endpoint: str | None,
    weights: dict[str, Any] | None,
    ready: int,
    desired: int,
) -> dict[str, Any]:
    return model_status(
        {
            "observedGeneration": meta.get("generation"),
            "phase": phase,
            "conditions": stamp(conditions, previous, now, meta.get("generation")),
            "rayService": service_name({"metadata": meta}, spec),
            "cluster": spec.cluster_ref.name if spec.cluster_ref is not None else None,
            "endpoint": endpoint,
            "task": spec.serving.task,
            # What an OpenAI client takes as base_url; only text tasks speak that protocol.
            "openaiBaseUrl": f"{endpoint}/v1" if endpoint and spec.serving.task != "tensor" else None,
            "weights": weights,
            "replicas": f"{ready}/{desired}",
            "readyReplicas": ready,
            "desiredReplicas": desired,
        }
    )


def stamp(
    conditions: list[dict[str, Any]], previous: list[dict[str, Any]], now: str, generation: int | None
) -> list[dict[str, Any]]:
    """Set lastTransitionTime: kept from `previous` while a condition's status is unchanged."""
    before = {c.get("type"): c for c in previous}
    stamped = []
    for item in conditions:
        old = before.get(item["type"]) or {}
        unchanged = old.get("status") == item["status"] and old.get("lastTransitionTime")
        since = old["lastTransitionTime"] if unchanged else now
        stamped.append({**item, "lastTransitionTime": since, "observedGeneration": generation})
    return stamped


def weights_from_info(info: ReplicaInfo) -> dict[str, Any]:
    """The runtime's /-/info answer, reduced to the status's weights fields."""
    return {
        "name": info.weights,
        "revision": info.revision,
        "bytes": info.bytes_shared,
        "tensors": info.tensor_count,
        "shared": info.shared,
        "attachSeconds": info.attach_seconds,
    }


def cluster_status(
    resource: dict[str, Any],
    spec: ZeroCopyClusterSpec,
    rayservice: dict[str, Any] | None,
    models: list[dict[str, Any]],
    store: list[dict[str, Any]],
    endpoint: str,
    now: str,
    openai: bool = False,
) -> dict[str, Any]:
    """A ZeroCopyCluster's status: its own readiness, and the models (status.models entries) and stores given;
    `openai`: its RayService runs the OpenAI router."""
    meta = resource["metadata"]
    previous = (resource.get("status") or {}).get("conditions") or []
    serving = [m for m in models if m["ready"]]
    refused = [m["name"] for m in models if m["application"] == "Refused"]
    summary = f"{len(serving)} of {len(models)} models serving" + (
        f"; refused: {', '.join(refused)}" if refused else ""
    )
    if rayservice is None:
        phase, cluster = (
            "Pending",
            condition("ClusterReady", False, "RayServiceMissing", f"creating RayService {meta['name']}"),
        )
    else:
        cluster = cluster_condition(rayservice)
        upgrading = any(
            c.get("type") == "UpgradeInProgress" and c.get("status") == "True"
            for c in (rayservice.get("status") or {}).get("conditions") or []
        )
        phase = "Upgrading" if upgrading else "Ready" if cluster["status"] == "True" else "Provisioning"
    ok = cluster["status"] == "True"
    ready = condition("Ready", ok, "ClusterReady" if ok else cluster["reason"], summary if ok else cluster["message"])
    models_ok = bool(models) and len(serving) == len(models)
    models_condition = condition("ModelsReady", models_ok, "AllServing" if models_ok else "NotAllServing", summary)
    return _checked(
        ZeroCopyClusterStatus,
        {
            "observedGeneration": meta.get("generation"),
            "phase": phase,
            "conditions": stamp([ready, cluster, models_condition], previous, now, meta.get("generation")),
            "rayService": meta["name"],
            "endpoint": endpoint,
            "openaiBaseUrl": f"{endpoint}/v1" if openai else None,
            "models": models,
            "modelsReady": f"{len(serving)}/{len(models)}",
            "objectStore": store,
            "objectStoreSummary": ", ".join(
                f"{use['group']} {quantity.human(use['weightsBytes'])}/{quantity.human(use['capacityBytes'])}"
                for use in store
            ),
        },
    )


def model_status(fields: dict[str, Any]) -> dict[str, Any]:
    """A ZeroCopyModel's status as the merge patch to write (camelCase; a None deletes the field), checked
    against `ZeroCopyModelStatus`, the type its CRD schema is generated from."""
    return _checked(ZeroCopyModelStatus, fields)


def _checked(kind: type[ZeroCopyModelStatus | ZeroCopyClusterStatus], fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` through the status type: a field it does not declare, or a value of the wrong type, is a bug
    here (ValueError) rather than a status the CRD keeps or prunes behind the operator's back."""
    built = kind.model_validate(fields)
    nested = [c.model_extra for c in built.conditions]
    if isinstance(built, ZeroCopyModelStatus) and built.weights is not None:
        nested.append(built.weights.model_extra)
    undeclared = sorted({key for extra in [built.model_extra, *nested] for key in extra or {}})
    if undeclared:
        raise ValueError(f"{kind.__name__} declares no field {', '.join(undeclared)}: declare it in api.py first")
    return built.model_dump(by_alias=True, exclude_unset=True)


def with_adapters(
    status: dict[str, Any], resource: dict[str, Any], spec: ZeroCopyModelSpec, info: ReplicaInfo, now: str
) -> dict[str, Any]:
    """`status` with an AdaptersReady condition for a model that lists adapters: False, naming each adapter its
    replicas could not serve and why (the model serves its other names meanwhile); True once all serve."""
    if not spec.adapters:
        return status
    errors = info.adapter_errors or {}
    if errors:
        adapters = condition("AdaptersReady", False, "AdapterFailed", "; ".join(errors[n] for n in sorted(errors)))
    else:
        adapters = condition("AdaptersReady", True, "Serving", f"{len(spec.adapters)} adapters serving")
    previous = (resource.get("status") or {}).get("conditions") or []
    generation = resource["metadata"].get("generation")
    return model_status(
        {**status, "conditions": [*status["conditions"], *stamp([adapters], previous, now, generation)]}
    )
