"""The API server's rules for objects: what the server owns in metadata, status, deletion and cascades.

kmock 0.8 stores objects as they are sent; kopf and kubectl rely on what a real server adds and enforces.
The objects live in kmock's `objects` array (so their history stays inspectable the kmock way) and the
resources in kmock's `resources` array (which discovery serves).
"""

from __future__ import annotations

import copy
import datetime
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
import kmock

from tests.kube import _discovery, _errors
from tests.kube._watch import EventLog, WatchEvent

ObjectKey = tuple[kmock.resource, str | None, str]  # (resource, namespace or None if cluster-scoped, name)

#: Metadata that clients cannot set or change; the server keeps its own values across updates.
SERVER_OWNED_METADATA = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
)

#: The API server's limit on the total size of an object's annotations. kubectl's client-side apply copies the
#: whole object into an annotation, which makes KubeRay's CRDs too big: apply them with `--server-side`.
MAX_ANNOTATIONS_BYTES = 256 * 1024


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _spec_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What `generation` tracks: everything but metadata and status."""
    return {key: value for key, value in obj.items() if key not in {"metadata", "status"}}


def _check_annotations(obj: dict[str, Any]) -> None:
    annotations = obj["metadata"].get("annotations") or {}
    size = sum(len(key.encode()) + len(str(value).encode()) for key, value in annotations.items())
    if size > MAX_ANNOTATIONS_BYTES:
        raise _errors.invalid(f"metadata.annotations: Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes")


def _established(crd: dict[str, Any]) -> dict[str, Any]:
    """What a real server reports on an accepted CRD (for `kubectl wait --for=condition=Established`)."""
    spec = crd.get("spec", {})
    conditions = [
        {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": _now(), "message": ""}
        for kind, reason in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
    ]
    stored = [version["name"] for version in spec.get("versions", []) if version.get("storage")]
    return {"conditions": conditions, "acceptedNames": spec.get("names", {}), "storedVersions": stored}


def _separate_status(
    info: kmock.ResourceInfo, current: dict[str, Any], proposed: dict[str, Any], subresource: str | None
) -> dict[str, Any]:
    """With a status subresource, `/status` writes change only status and other writes never do."""
    if "status" not in info.subresources:
        return copy.deepcopy(proposed)
    if subresource == "status":
        updated, status_from = copy.deepcopy(current), proposed
    else:
        updated, status_from = copy.deepcopy(proposed), current
    if "status" in status_from:
        updated["status"] = copy.deepcopy(status_from["status"])
    else:
        updated.pop("status", None)
    return updated


@attrs.define
class Store:
    """Objects with the API server's semantics. Methods are synchronous: each is one atomic step of the event
    loop, and every write goes through `_commit`, which gives it a new `resourceVersion` and a watch event."""

    objects: kmock.ObjectsArray
    resources: kmock.ResourcesArray
    log: EventLog = attrs.field(factory=EventLog)
    last_resource_version: int = 0

    def live(self, key: ObjectKey) -> dict[str, Any] | None:
        """A copy of the object's current version, or None if it does not exist (any more)."""
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def existing(self, key: ObjectKey) -> dict[str, Any]:
        obj = self.live(key)
        if obj is None:
            raise _errors.not_found(key[0], key[2])
        return obj

    def live_objects(self, resource: kmock.resource | None = None) -> list[tuple[ObjectKey, dict[str, Any]]]:
        """Copies of all existing objects (of one resource, if given), sorted by namespace and name."""
        found = [
            (key, copy.deepcopy(obj.raw))
            for key, obj in self.objects.items()
            if not obj.deleted and (resource is None or key[0] == resource)
        ]
        return sorted(found, key=lambda item: (item[0][1] or "", item[0][2]))

    def create(
        self, resource: kmock.resource, info: kmock.ResourceInfo, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        """Store a new object: stamped with uid, creationTimestamp, generation 1; status only via /status."""
        key = (resource, namespace, body["metadata"]["name"])
        if namespace is not None and self.live((_discovery.NAMESPACES, None, namespace)) is None:
            raise _errors.not_found(_discovery.NAMESPACES, namespace)
        if self.live(key) is not None:
            raise _errors.already_exists(resource, key[2])
        obj = {**copy.deepcopy(body), "apiVersion": api_version(resource), "kind": info.kind}
        meta = obj["metadata"]
        for field in ("namespace", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        if namespace is not None:
            meta["namespace"] = namespace
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if "status" in info.subresources:
            obj.pop("status", None)
        if resource == _discovery.CRDS:
            obj["status"] = _established(obj)
        if resource == _discovery.NAMESPACES:
            obj["status"] = {"phase": "Active"}
        self._commit(key, obj, "ADDED")
        return obj

    def update(
        self,
        key: ObjectKey,
        info: kmock.ResourceInfo,
        current: dict[str, Any],
        proposed: dict[str, Any],
        subresource: str | None,
    ) -> dict[str, Any]:
        """Write `proposed` over `current`: 409 if it names another resourceVersion; server-owned metadata
        kept; generation bumped if the spec changed; a no-op writes nothing (no new resourceVersion)."""
        expected_version = (proposed.get("metadata") or {}).get("resourceVersion")
        if expected_version and expected_version != current["metadata"]["resourceVersion"]:
            raise _errors.conflict(key[0], key[2])
        updated = _separate_status(info, current, proposed, subresource)
        updated.update(apiVersion=current["apiVersion"], kind=current["kind"])
        meta = updated["metadata"] = dict(updated.get("metadata") or {})
        for field in SERVER_OWNED_METADATA:
            if field in current["metadata"]:
                meta[field] = current["metadata"][field]
            else:
                meta.pop(field, None)
        if updated == current:
            return current
        if _spec_of(updated) != _spec_of(current):
            meta["generation"] = current["metadata"].get("generation", 0) + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key, updated)  # the last finalizer is gone: deletion completes
        else:
            self._commit(key, updated, "MODIFIED")
        return updated

    def delete(self, key: ObjectKey, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Mark for deletion while finalizers remain (the object is returned), or remove now (None)."""
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return obj
        if meta.get("finalizers"):
            meta.update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            self._commit(key, obj, "MODIFIED")
            return obj
        self._remove(key, obj)
        return None

    def _remove(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        self._commit(key, obj, "DELETED")
        self._cascade(key, obj)

    def _cascade(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        """What the garbage collector and the namespace and CRD controllers do once an object is gone.

        Dependents (by `ownerReferences` uid) and a namespace's objects are deleted (finalizers respected);
        a CRD's objects are removed outright. Foreground and orphan propagation are not emulated.
        """
        resource, _, name = key
        uid = obj["metadata"]["uid"]
        gone_resources = _discovery.crd_resources(obj) if resource == _discovery.CRDS else {}
        for other_key, other in self.live_objects():
            if self.live(other_key) is None:  # removed by a cascade earlier in this loop
                continue
            owners = {ref.get("uid") for ref in other["metadata"].get("ownerReferences") or []}
            if other_key[0] in gone_resources:
                self._remove(other_key, other)
            elif uid in owners or (resource == _discovery.NAMESPACES and other_key[1] == name):
                self.delete(other_key, self.existing(other_key))

    def _sync_discovery(self, key: ObjectKey, crd: dict[str, Any], event_type: str) -> None:
        """Serve a CRD's resources from its creation to its deletion; 422 (before any write) if malformed."""
        new = {} if event_type == "DELETED" else _discovery.crd_resources(crd)
        current = self.live(key)
        for resource in _discovery.crd_resources(current) if current is not None else {}:
            del self.resources[resource]
        for resource, info in new.items():
            self.resources[resource] = info

    def _commit(self, key: ObjectKey, obj: dict[str, Any], event_type: str) -> None:
        """The only way state changes: a new resourceVersion, the stored version and the watch event.

        What a real server validates on every write is checked first, so that a 422 leaves no trace.
        """
        _check_annotations(obj)
        if key[0] == _discovery.CRDS:
            self._sync_discovery(key, obj, event_type)
        self.last_resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.last_resource_version)
        if event_type == "DELETED":
            self.objects[key].delete()
        elif key in self.objects:
            self.objects[key].history.append(copy.deepcopy(obj))
        else:
            self.objects[key] = copy.deepcopy(obj)
        self.log.append(WatchEvent(self.last_resource_version, key[0], event_type, copy.deepcopy(obj)))
