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

from tests.kube import _apply, _discovery, _errors
from tests.kube._admission import WriteOptions, admit
from tests.kube._watch import EventLog, WatchEvent

ObjectKey = tuple[kmock.resource, str | None, str]  # (resource, namespace or None if cluster-scoped, name)

#: The finalizers with which the garbage collector and the namespace controller hold an object being deleted.
FOREGROUND = "foregroundDeletion"
NAMESPACE_FINALIZER = "kubernetes"  # a namespace's is in `spec.finalizers`; here in metadata's, hidden from clients

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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _spec_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What `generation` tracks: everything but metadata and status."""
    return {key: value for key, value in obj.items() if key not in {"metadata", "status"}}


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

    def schema(self, resource: kmock.resource) -> dict[str, Any] | None:
        """The `openAPIV3Schema` of a custom resource's version (not a copy: read it only); None for built-ins."""
        version = self.crd_version(resource)
        return ((version or {}).get("schema") or {}).get("openAPIV3Schema")

    def crd_version(self, resource: kmock.resource) -> dict[str, Any] | None:
        """The entry of `spec.versions` of the CRD that serves `resource` (not a copy); None for built-ins."""
        key = (_discovery.CRDS, None, f"{resource.plural}.{resource.group}")
        if not resource.group or key not in self.objects or self.objects[key].deleted:
            return None
        versions = self.objects[key].raw.get("spec", {}).get("versions", [])
        return next((v for v in versions if v.get("name") == str(resource.version)), None)

    def _check_namespace(self, resource: kmock.resource, namespace: str, name: str) -> None:
        """New objects need a namespace that exists and is not being deleted (403 while it terminates)."""
        key = (_discovery.NAMESPACES, None, namespace)
        if key not in self.objects or self.objects[key].deleted:
            raise _errors.not_found(_discovery.NAMESPACES, namespace)
        if self.objects[key].raw["metadata"].get("deletionTimestamp"):
            why = f"unable to create new content in namespace {namespace} because it is being terminated"
            raise _errors.forbidden(resource, name, why)

    def create(
        self,
        resource: kmock.resource,
        info: kmock.ResourceInfo,
        namespace: str | None,
        body: dict[str, Any],
        options: WriteOptions | None = None,
    ) -> dict[str, Any]:
        """Store a new object: stamped with uid, creationTimestamp, generation 1; status only via /status;
        admitted (pruned, defaulted, validated) as the API server does."""
        key = (resource, namespace, body["metadata"]["name"])
        if namespace is not None:
            self._check_namespace(resource, namespace, key[2])
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
        options = options or WriteOptions()
        if not options.applied:
            separate = "status" in info.subresources
            meta["managedFields"] = _apply.record_update(
                None, obj, self.schema(resource), options.field_manager, None, separate
            )
        obj = admit(resource, info.kind, self.schema(resource), obj, None, options)
        _apply.keep_present(obj)
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
        options: WriteOptions | None = None,
    ) -> dict[str, Any]:
        """Write `proposed` over `current`: 409 if it names another resourceVersion; server-owned metadata
        kept; admitted (pruned, defaulted, validated); generation bumped if the spec changed; a no-op writes
        nothing (no new resourceVersion)."""
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
        options = options or WriteOptions()
        updated = admit(key[0], info.kind, self.schema(key[0]), updated, current, options)
        if options.applied:
            updated["metadata"]["managedFields"] = (proposed.get("metadata") or {}).get("managedFields") or []
        else:
            updated["metadata"]["managedFields"] = _apply.record_update(
                current, updated, self.schema(key[0]), options.field_manager, subresource, "status" in info.subresources
            )
        _apply.keep_present(updated)
        meta = updated["metadata"]
        if updated == current:
            return current
        if _spec_of(updated) != _spec_of(current):
            meta["generation"] = current["metadata"].get("generation", 0) + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key, updated)  # the last finalizer is gone: deletion completes
        else:
            self._commit(key, updated, "MODIFIED")
        return updated

    def delete(self, key: ObjectKey, obj: dict[str, Any], propagation: str = "Background") -> dict[str, Any] | None:
        """Mark for deletion while finalizers remain (the object is returned), or remove now (None).

        `propagation` is the garbage collector's: Background deletes dependents after the owner, Orphan
        keeps them (minus their reference to it), Foreground holds the owner with the `foregroundDeletion`
        finalizer until they are gone. A namespace terminates: its objects are deleted, new ones refused,
        and it goes once it is empty.
        """
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return obj
        if propagation == "Orphan":
            self._orphan(meta["uid"])
        dependents = self._dependents(meta["uid"])
        if propagation == "Foreground" and dependents:
            meta["finalizers"] = [*(meta.get("finalizers") or []), FOREGROUND]
        if key[0] == _discovery.NAMESPACES:
            obj.update(spec={"finalizers": ["kubernetes"]}, status={"phase": "Terminating"})
            meta["finalizers"] = [*(meta.get("finalizers") or []), NAMESPACE_FINALIZER]
        if meta.get("finalizers"):
            meta.update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            self._commit(key, obj, "MODIFIED")
            for dependent in dependents if propagation == "Foreground" else []:
                self.delete(dependent, self.existing(dependent))
            if key[0] == _discovery.NAMESPACES:
                for other_key, other in self.live_objects():
                    if other_key[1] == key[2] and self.live(other_key) is not None:
                        self.delete(other_key, other)
            self._release_if_done(key)
            return self.live(key)
        self._remove(key, obj)
        return None

    def _dependents(self, uid: str) -> list[ObjectKey]:
        return [
            key
            for key, obj in self.live_objects()
            if uid in {ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []}
        ]

    def _orphan(self, uid: str) -> None:
        """What the garbage collector does for `--cascade=orphan`: dependents lose their reference to the owner."""
        for key in self._dependents(uid):
            obj = self.existing(key)
            refs = [ref for ref in obj["metadata"]["ownerReferences"] if ref.get("uid") != uid]
            if refs:
                obj["metadata"]["ownerReferences"] = refs
            else:
                del obj["metadata"]["ownerReferences"]
            self._commit(key, obj, "MODIFIED")

    def _release_if_done(self, key: ObjectKey) -> None:
        """Drop the finalizers of the garbage collector and the namespace controller once their work is done."""
        obj = self.live(key)
        if obj is None or not obj["metadata"].get("deletionTimestamp"):
            return
        finalizers = list(obj["metadata"].get("finalizers") or [])
        if FOREGROUND in finalizers and not self._dependents(obj["metadata"]["uid"]):
            finalizers.remove(FOREGROUND)
        if NAMESPACE_FINALIZER in finalizers and not any(k[1] == key[2] for k, _ in self.live_objects()):
            finalizers.remove(NAMESPACE_FINALIZER)
        if finalizers == obj["metadata"].get("finalizers"):
            return
        obj["metadata"]["finalizers"] = finalizers
        if finalizers:
            self._commit(key, obj, "MODIFIED")
        else:
            del obj["metadata"]["finalizers"]
            self._remove(key, obj)

    def collect_if_orphaned(self, key: ObjectKey) -> None:
        """The garbage collector deletes an object all of whose owners (by uid) do not exist."""
        obj = self.live(key)
        refs = (obj or {}).get("metadata", {}).get("ownerReferences") or []
        if obj is None or not refs:
            return
        live_uids = {other["metadata"]["uid"] for _, other in self.live_objects()}
        if not any(ref.get("uid") in live_uids for ref in refs):
            self.delete(key, obj)

    def _remove(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        self._commit(key, obj, "DELETED")
        self._cascade(key, obj)

    def _cascade(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        """What the garbage collector and the namespace and CRD controllers do once an object is gone.

        Dependents (by `ownerReferences` uid) are deleted (finalizers respected); a CRD's objects are removed
        outright; owners waiting in the foreground, and a terminating namespace, are released when done.
        """
        resource, namespace, _ = key
        gone_resources = _discovery.crd_resources(obj) if resource == _discovery.CRDS else {}
        for other_key in [k for k, _ in self.live_objects() if k[0] in gone_resources]:
            self._remove(other_key, self.existing(other_key))
        for other_key in self._dependents(obj["metadata"]["uid"]):
            if self.live(other_key) is not None:  # not removed by a cascade earlier in this loop
                self.delete(other_key, self.existing(other_key))
        live = {other["metadata"]["uid"]: other_key for other_key, other in self.live_objects()}
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("uid") in live:
                self._release_if_done(live[ref["uid"]])
        if namespace is not None:
            self._release_if_done((_discovery.NAMESPACES, None, namespace))

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

        A malformed CRD is refused first, so that a 422 leaves no trace.
        """
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
