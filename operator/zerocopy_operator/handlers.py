"""kopf handlers: thin translations from events to `reconcile` calls, and from outcomes to kopf's terms.

A bad spec is a PermanentError (condition, Event, no retry until the spec
changes); "not yet" and API hiccups are TemporaryErrors with a back-off.
There are no deletion handlers and no timers, so kopf adds no finalizer:
the RayService goes with its ZeroCopyModel by owner reference.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from . import reconcile as rc
from .api import GROUP, PLURAL, VERSION
from .kube import KUBERAY_CRD, RAY_GROUP, RAY_PLURAL, RAY_VERSION, Kube
from .manifests import MODEL_LABEL
from .status import REFUSED

MODELS = (GROUP, VERSION, PLURAL)
RAYSERVICES = (RAY_GROUP, RAY_VERSION, RAY_PLURAL)


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


@kopf.on.resume(*MODELS)
@kopf.on.create(*MODELS)
@kopf.on.update(*MODELS)
def reconcile_model(body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any) -> None:
    """Validate, build, adopt, apply, and write what was observed."""
    resource = _plain(body)
    try:
        spec = rc.check(memo.kube, resource)
        action, _ = rc.apply(memo.kube, resource, memo.settings)
    except rc.NotOurs as exc:
        kopf.warn(body, reason="Conflict", message=str(exc))
        raise kopf.TemporaryError(str(exc), delay=60) from None
    except ApiException as exc:
        raise kopf.TemporaryError(f"Kubernetes API error {exc.status} {exc.reason}; retrying", delay=10) from None
    except Exception as exc:  # a bad spec, or a bug: either way retrying the same spec cannot help
        status = rc.refused_status(resource, exc)
        patch.status.update(status)
        kopf.warn(body, reason=status["conditions"][0]["reason"], message=status["conditions"][0]["message"])
        raise kopf.PermanentError(str(exc)) from None
    if action != "unchanged":
        kopf.event(
            body, type="Normal", reason=action.title(), message=f"RayService {resource['metadata']['name']} {action}"
        )
    patch.status.update(rc.observe(memo.kube, resource, spec, memo.settings))


@kopf.on.event(*RAYSERVICES, labels={MODEL_LABEL: kopf.PRESENT})
def rayservice_event(event: kopf.RawEvent, memo: Any, logger: logging.Logger | logging.LoggerAdapter, **_: Any) -> None:
    """Mirror KubeRay's progress into the model at once, and put back a RayService deleted or edited by hand."""
    rayservice: dict[str, Any] = dict(event["object"])
    name, namespace = rc.owner_name(rayservice), rayservice["metadata"]["namespace"]
    resource = memo.kube.get_model(namespace, name) if name else None
    if resource is None or resource["metadata"].get("deletionTimestamp") or _refused(resource):
        return
    try:
        spec = rc.check(memo.kube, resource)
        current = None if event["type"] == "DELETED" else rayservice
        if current is None or not rc.contains(current, rc.desired_rayservice(resource, memo.settings)):
            action, _ = rc.apply(memo.kube, resource, memo.settings)
            if action != "unchanged":
                kopf.event(
                    resource,
                    type="Normal",
                    reason="Restored",
                    message=f"RayService {name} {action} after a change by hand",
                )
            current = None
        status = rc.observe(memo.kube, resource, spec, memo.settings, current)
    except Exception as exc:  # the model's own handler reports these (a bad spec, a conflict, a bug)
        logger.warning("Not mirroring RayService %s/%s: %s", namespace, name, exc)
        return
    if _changed(resource.get("status") or {}, status):
        memo.kube.patch_model_status(namespace, resource["metadata"]["name"], status)


@kopf.on.event(*MODELS)
def model_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    """When a model goes, retry the namespace's models it was blocking (a route it held, for example)."""
    if event["type"] != "DELETED":
        return
    namespace = event["object"]["metadata"]["namespace"]
    for other in memo.kube.list_models(namespace):
        if _refused(other):
            try:
                rc.check(memo.kube, other)
            except Exception:  # still refused: its condition already says why
                continue
            # Valid now: touch an annotation so that kopf runs the model's update handler.
            memo.kube.annotate_model(namespace, other["metadata"]["name"], {f"{GROUP}/retry": rc.now()})


def _plain(body: kopf.Body) -> dict[str, Any]:
    return {key: body[key] for key in body}


def _refused(resource: dict[str, Any]) -> bool:
    """Whether this generation of the model was already refused as invalid (no retry storm)."""
    status = resource.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return ready.get("reason") in REFUSED and status.get("observedGeneration") == resource["metadata"].get("generation")


def _changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    def strip(status: dict[str, Any]) -> dict[str, Any]:
        conditions = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []]
        return {**status, "conditions": conditions}

    return strip(old) != strip(new)
