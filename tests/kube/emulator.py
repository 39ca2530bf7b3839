"""A stateful Kubernetes API emulator on 127.0.0.1, good enough for the real `kopf run` and `/usr/bin/kubectl`.

No cluster can run on the test machines, so integration tests talk to this instead: kmock's
`KubernetesEmulator` (HTTP serving, request bookkeeping, discovery, object history) extended where kmock 0.8
falls short of what kopf and kubectl rely on. Each gap is closed in one method of `KubeApiEmulator`:

- metadata the server owns: `uid`, `resourceVersion` (every write), `creationTimestamp`, `generation` (only
  when something but metadata and status changes) — `_create`, `_update`, `_commit`;
- the status subresource: main-resource writes keep the old status, `/status` writes change only status —
  `_separate_status`;
- PATCH flavours (JSON merge, strategic merge as JSON merge, JSON patch with 422 on a failed `test` op,
  server-side apply that creates when missing) — `_serve_update` and `_patches`; PUT with 409 on a stale
  `resourceVersion` — `_serve_replace`;
- watches that resume from a `resourceVersion`, end after `timeoutSeconds`, and are `application/json` —
  `_serve_watch` and `_watch.EventLog`; lists with `kind`, `apiVersion` and a `resourceVersion` — `_serve_list`;
  label and field selectors on both — `_selectors`;
- deletion with finalizers, owner-reference and namespace cascades, CRD removal — `_delete`, `_cascade`;
- CRDs that appear in (and vanish from) discovery with verbs, scope, short names and subresources, built-ins
  from the start, the most stable version preferred — `_sync_discovery`, `_serve_apis`, `_discovery`;
- `kind: Status` errors with the real reasons and codes — `_render_error`, `_errors`.

Tests use `running_emulator`, which serves a fresh emulator in a background thread and yields a `Cluster`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import datetime
import logging
import os
import re
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal.rendering import StreamingError  # kmock's wrapper for failures after a stream began

from tests.kube import _discovery, _errors, _http, _patches, _selectors
from tests.kube._watch import EventLog, WatchEvent

KUBECTL = "/usr/bin/kubectl"

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

ObjectKey = tuple[kmock.resource, str | None, str]  # (resource, namespace or None if cluster-scoped, name)
Predicate = Callable[[Mapping[str, Any]], bool]

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_version(resource: kmock.resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def _spec_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What `generation` tracks: everything but metadata and status."""
    return {key: value for key, value in obj.items() if key not in {"metadata", "status"}}


@attrs.define(kw_only=True)
class KubeApiEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the API server behaviour that kopf and kubectl depend on.

    All state changes are synchronous steps of the event loop, which makes each request atomic without locks;
    every write goes through `_commit`, which stamps the `resourceVersion`, stores the version in kmock's
    `objects` (history included) and appends the watch event.
    """

    _last_resource_version: int = attrs.field(default=0, init=False)
    _log: EventLog = attrs.field(factory=EventLog, init=False)
    #: Exceptions the emulator raised on requests: bugs here, 500s a real API server would not return.
    internal_errors: list[BaseException] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for resource, info in _discovery.builtin_resources().items():
            self.resources[resource] = info
        self.fallback["put"] << self._serve_replace
        self.fallback["get /openapi/v3"] << _discovery.OPENAPI_V3_INDEX
        self.fallback["get", re.compile(r"/openapi/v3/apis/apiextensions\.k8s\.io/v1")] << _discovery.OPENAPI_V3_CRDS

    def close_watches(self) -> None:
        """End the open watch responses (e.g. before shutdown: the server waits for open requests)."""
        self._log.close()

    # -- request plumbing ------------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve one request, parsed by `_http.parse_request` (kmock's parser fails on namespace URLs)."""
        request = await _http.parse_request(raw_request, id=len(self._requests))
        self._requests.append(request)
        try:
            return await self._handle(request)
        except kmock.KubernetesError as exc:
            return await self._render_error(exc)
        except StreamingError as exc:  # the response has begun: only an error event can still be sent
            self._record_internal_error(exc.__cause__ or exc)
            raw_response: aiohttp.web.StreamResponse = exc.args[0]
            await self._stream_error(exc.__cause__ or exc, raw_response)
            await raw_response.write_eof()
            return raw_response
        except Exception as exc:
            self._record_internal_error(exc)
            return await self._render_error(exc)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # KubernetesEmulator._handle writes to kmock's store before dispatching, without any of the metadata
        # rules; here the _serve_* reactions make every change, so dispatch to the reactions straight away.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    def _record_internal_error(self, exc: BaseException) -> None:
        logger.error("The Kubernetes API emulator failed on a request", exc_info=exc)
        self.internal_errors.append(exc)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        """A `kind: Status` body as the API server sends it; kmock's adds a traceback to expected 4xx too."""
        if not isinstance(exc, kmock.KubernetesError):
            return await super()._render_error(exc)
        status = {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": exc.message,
            "reason": exc.reason,
            "details": exc.details or {},
            "code": exc.status,
        }
        return aiohttp.web.json_response(status, status=exc.status)

    # -- discovery -------------------------------------------------------------------------------------------

    def _get_resources(self) -> list[kmock.resource]:
        """Only what is declared is served (kmock also serves resources of stored objects, even deleted ones)."""
        return list(self._resources)

    async def _serve_server_version(self, request: kmock.Request) -> kmock.Payload:
        return _discovery.SERVER_VERSION

    async def _serve_apis(self, request: kmock.Request) -> kmock.Payload:
        """kmock picks an arbitrary preferred version; kubectl must get v1 for ray.io, not v1alpha1."""
        versions: dict[str, set[str]] = collections.defaultdict(set)
        for resource in self._resources:
            if resource.group:
                versions[resource.group].add(str(resource.version))
        groups = [_discovery.api_group(group, versions[group]) for group in sorted(versions)]
        return {"apiVersion": "v1", "kind": "APIGroupList", "groups": groups}

    async def _serve_group(self, request: kmock.Request) -> kmock.Payload:
        group = request.resource.group if request.resource is not None else None
        versions = {str(resource.version) for resource in self._resources if group and resource.group == group}
        if not group or not versions:
            raise _errors.unknown_resource()
        return {"apiVersion": "v1", "kind": "APIGroup", **_discovery.api_group(group, versions)}

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None  # routed here by its /api/<version> or /apis/<group>/<version> path
        group, version = request.resource.group or "", str(request.resource.version)
        if not any((resource.group, resource.version) == (group, version) for resource in self._resources):
            raise _errors.unknown_resource()
        return _discovery.api_resource_list(group, version, self._resources)

    def _sync_discovery(self, key: ObjectKey, crd: dict[str, Any], event_type: str) -> None:
        """Serve a CRD's resources from its creation to its deletion; 422 (before any write) if malformed."""
        new = {} if event_type == "DELETED" else _discovery.crd_resources(crd)
        current = self._live(key)
        for resource in _discovery.crd_resources(current) if current is not None else {}:
            del self._resources[resource]
        for resource, info in new.items():
            self._resources[resource] = info

    # -- addressing and storage ------------------------------------------------------------------------------

    def _served(self, request: kmock.Request) -> kmock.ResourceInfo:
        """The discovery info of the addressed resource; 404 wherever a real server has no route."""
        resource = request.resource
        if resource is None or resource.plural is None or resource not in self._resources:
            raise _errors.unknown_resource()
        info = self._resources[resource]
        scoped_wrongly = request.namespace is not None and not info.namespaced
        unnamespaced_object = info.namespaced and request.namespace is None and request.name is not None
        if scoped_wrongly or unnamespaced_object or request.subresource not in {None, *info.subresources}:
            raise _errors.unknown_resource()
        return info

    def _key(self, request: kmock.Request, info: kmock.ResourceInfo) -> ObjectKey:
        assert request.resource is not None and request.name is not None  # checked by _served and routing
        return (request.resource, request.namespace if info.namespaced else None, request.name)

    def _live(self, key: ObjectKey) -> dict[str, Any] | None:
        """A copy of the object's current version, or None if it does not exist (any more)."""
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def _existing(self, key: ObjectKey) -> dict[str, Any]:
        obj = self._live(key)
        if obj is None:
            raise _errors.not_found(key[0], key[2])
        return obj

    def _live_objects(self, resource: kmock.resource | None = None) -> list[tuple[ObjectKey, dict[str, Any]]]:
        """Copies of all existing objects (of one resource, if given), sorted by namespace and name."""
        found = [
            (key, copy.deepcopy(obj.raw))
            for key, obj in self._objects.items()
            if not obj.deleted and (resource is None or key[0] == resource)
        ]
        return sorted(found, key=lambda item: (item[0][1] or "", item[0][2]))

    def _commit(self, key: ObjectKey, obj: dict[str, Any], event_type: str) -> None:
        """The only way state changes: a new resourceVersion, the stored version and the watch event."""
        if key[0] == _discovery.CRDS:
            self._sync_discovery(key, obj, event_type)
        self._last_resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self._last_resource_version)
        if event_type == "DELETED":
            self._objects[key].delete()
        elif key in self._objects:
            self._objects[key].history.append(copy.deepcopy(obj))
        else:
            self._objects[key] = copy.deepcopy(obj)
        self._log.append(WatchEvent(self._last_resource_version, key[0], event_type, copy.deepcopy(obj)))

    # -- create, read, list, watch ---------------------------------------------------------------------------

    def _object_body(self, request: kmock.Request) -> dict[str, Any]:
        body = _http.decode_body(request.body, request.headers)
        if not isinstance(body, dict):
            raise _errors.bad_request("the request body must be an object")
        body.setdefault("metadata", {})
        return body

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        info = self._served(request)
        assert request.resource is not None  # checked by _served
        body = self._object_body(request)
        meta = body["metadata"]
        if request.namespace and meta.setdefault("namespace", request.namespace) != request.namespace:
            raise _errors.bad_request("the namespace of the object does not match the namespace on the request")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise _errors.invalid("metadata.name: Required value: name or generateName is required")
        namespace = (meta.get("namespace") or "default") if info.namespaced else None
        return kmock.Response(status=201, payload=self._create(request.resource, info, namespace, body))

    def _create(
        self, resource: kmock.resource, info: kmock.ResourceInfo, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        key = (resource, namespace, body["metadata"]["name"])
        if self._live(key) is not None:
            raise _errors.already_exists(resource, key[2])
        obj = {**copy.deepcopy(body), "apiVersion": _api_version(resource), "kind": info.kind}
        meta = obj["metadata"]
        for field in ("namespace", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(field, None)
        if namespace is not None:
            meta["namespace"] = namespace
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        if "status" in info.subresources:  # status is written only through its subresource
            obj.pop("status", None)
        if resource == _discovery.CRDS:
            obj["status"] = self._established(obj)
        self._commit(key, obj, "ADDED")
        return obj

    @staticmethod
    def _established(crd: dict[str, Any]) -> dict[str, Any]:
        """The status a real server gives an accepted CRD, so that `kubectl wait --for=condition=Established` works."""
        spec = crd.get("spec", {})
        conditions = [
            {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": _now(), "message": ""}
            for kind, reason in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
        ]
        stored = [version["name"] for version in spec.get("versions", []) if version.get("storage")]
        return {"conditions": conditions, "acceptedNames": spec.get("names", {}), "storedVersions": stored}

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        return self._existing(self._key(request, self._served(request)))

    def _selection(self, request: kmock.Request) -> Predicate:
        """Which objects a list or watch request is about: its namespace, name, label and field selectors."""
        selected = _selectors.selected(request.params)

        def matches(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata", {})
            in_namespace = request.namespace is None or meta.get("namespace") == request.namespace
            named = request.name is None or meta.get("name") == request.name
            return in_namespace and named and selected(obj)

        return matches

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        info = self._served(request)
        assert request.resource is not None  # checked by _served
        matches = self._selection(request)
        return {
            "apiVersion": _api_version(request.resource),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": str(self._last_resource_version)},
            "items": [obj for _, obj in self._live_objects(request.resource) if matches(obj)],
        }

    async def _serve_watch(self, request: kmock.Request) -> kmock.Payload:
        """Line-delimited JSON events newer than `resourceVersion`; with none or "0", the current objects first."""
        self._served(request)
        assert request.resource is not None  # checked by _served
        matches = self._selection(request)
        since = request.params.get("resourceVersion", "")
        timeout = request.params.get("timeoutSeconds")
        if not re.fullmatch(r"\d*", since) or not re.fullmatch(r"\d*", timeout or ""):
            raise _errors.bad_request("resourceVersion and timeoutSeconds must be whole numbers")
        initial: list[dict[str, Any]] = []
        if since in {"", "0"}:
            initial = [obj for _, obj in self._live_objects(request.resource) if matches(obj)]
            since = str(self._last_resource_version)
        events = self._watch_events(request.resource, matches, initial, int(since), float(timeout) if timeout else None)
        return kmock.Response(headers={"Content-Type": "application/json"}, payload=events)

    async def _watch_events(
        self,
        resource: kmock.resource,
        matches: Predicate,
        initial: list[dict[str, Any]],
        since: int,
        timeout: float | None,
    ) -> AsyncIterator[kmock.Payload]:
        yield b""  # sends the headers now: clients wait for them before reading any event
        for obj in initial:
            yield {"type": "ADDED", "object": obj}
        async for event in self._log.follow(since, timeout):
            if event.resource == resource and matches(event.object):
                yield {"type": event.type, "object": event.object}

    # -- update, replace -------------------------------------------------------------------------------------

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        info = self._served(request)
        key = self._key(request, info)
        patch_type = _http.content_type(request.headers)
        if patch_type not in _patches.PATCH_TYPES:
            raise _errors.unsupported_media_type(patch_type)
        patch = _http.decode_body(request.body, request.headers)
        current = self._live(key)
        if current is None and patch_type == _patches.APPLY_PATCH and request.subresource is None:
            return kmock.Response(status=201, payload=self._create_applied(key, info, patch))
        if current is None:
            raise _errors.not_found(key[0], key[2])
        return self._update(key, info, current, _patches.apply_patch(current, patch_type, patch), request.subresource)

    def _create_applied(self, key: ObjectKey, info: kmock.ResourceInfo, patch: Any) -> dict[str, Any]:
        """Server-side apply of a missing object creates it, named and scoped by the URL."""
        if not isinstance(patch, dict):
            raise _errors.bad_request("an apply patch must be an object")
        resource, namespace, name = key
        meta = patch.setdefault("metadata", {})
        if meta.setdefault("name", name) != name or meta.setdefault("namespace", namespace) != namespace:
            raise _errors.bad_request("the name or namespace of the object does not match the request's")
        return self._create(resource, info, namespace, patch)

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        """PUT: a whole new object, conditional on its `resourceVersion` if it carries one."""
        info = self._served(request)
        if request.name is None:
            raise _errors.bad_request("PUT needs an object's URL")
        key = self._key(request, info)
        body = self._object_body(request)
        if body["metadata"].get("name", request.name) != request.name:
            raise _errors.bad_request("the name of the object does not match the name on the URL")
        return self._update(key, info, self._existing(key), body, request.subresource)

    def _update(
        self,
        key: ObjectKey,
        info: kmock.ResourceInfo,
        current: dict[str, Any],
        proposed: dict[str, Any],
        subresource: str | None,
    ) -> dict[str, Any]:
        """Write `proposed` over `current` with the API server's rules; a no-op writes nothing, as there."""
        expected_version = (proposed.get("metadata") or {}).get("resourceVersion")
        if expected_version and expected_version != current["metadata"]["resourceVersion"]:
            raise _errors.conflict(key[0], key[2])
        updated = self._separate_status(info, current, proposed, subresource)
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

    @staticmethod
    def _separate_status(
        info: kmock.ResourceInfo, current: dict[str, Any], proposed: dict[str, Any], subresource: str | None
    ) -> dict[str, Any]:
        """With a status subresource, `/status` writes change only status and other writes never do."""
        if "status" not in info.subresources:
            return copy.deepcopy(proposed)
        updated, source = (copy.deepcopy(current), proposed) if subresource == "status" else (copy.deepcopy(proposed), current)
        if "status" in source:
            updated["status"] = copy.deepcopy(source["status"])
        else:
            updated.pop("status", None)
        return updated

    # -- delete and garbage collection -----------------------------------------------------------------------

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        """The object while finalizers hold it (with `deletionTimestamp`), else a Success status."""
        key = self._key(request, self._served(request))
        remaining = self._delete(key, self._existing(key))
        if remaining is not None:
            return remaining
        resource, _, name = key
        details = {"name": name, "group": resource.group, "kind": resource.plural}
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success", "details": details}

    def _delete(self, key: ObjectKey, obj: dict[str, Any]) -> dict[str, Any] | None:
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
        for other_key, other in self._live_objects():
            if self._live(other_key) is None:  # removed by a cascade earlier in this loop
                continue
            owners = {ref.get("uid") for ref in other["metadata"].get("ownerReferences") or []}
            if other_key[0] in gone_resources:
                self._remove(other_key, other)
            elif uid in owners or (resource == _discovery.NAMESPACES and other_key[1] == name):
                self._delete(other_key, self._existing(other_key))


@attrs.frozen
class Cluster:
    """A Kubernetes API as tests reach it: a kubeconfig (for kopf and the real kubectl) and its server URL."""

    kubeconfig: Path
    url: str
    #: kubectl's discovery cache, one per cluster: a later emulator on the same port must not see stale groups.
    cache_dir: Path

    def kubectl_command(self, *args: str) -> list[str]:
        """The command line for the real kubectl against this cluster, e.g. for `subprocess.Popen`."""
        return [KUBECTL, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}", *args]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl to completion; stdout and stderr are captured as text."""
        command = self.kubectl_command(*args)
        return subprocess.run(command, input=input, capture_output=True, text=True, check=check, timeout=timeout)

    def env(self) -> dict[str, str]:
        """This process's environment with `KUBECONFIG` pointing here, for subprocesses such as `kopf run`."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}


class EmulatorCrashed(AssertionError):
    """The emulator raised on a request: a bug in it, reported so that it does not pass as a test result."""


def write_kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig for `url` with a dummy token: the emulator accepts every request."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


class _ServerThread:
    """Runs the emulator on its own event loop, so it serves while the test thread blocks on subprocesses."""

    def __init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kube-api-emulator", daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._url: str | None = None
        self._failure: BaseException | None = None
        self.emulator: KubeApiEmulator | None = None

    def start(self, timeout: float = 30) -> str:
        """Start serving; the server's URL."""
        self._thread.start()
        if not self._ready.wait(timeout) or self._url is None:
            raise RuntimeError("the Kubernetes API emulator did not start") from self._failure
        return self._url

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._failure = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with KubeApiEmulator() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self._url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stopping.wait()
            emulator.close_watches()

    def stop(self, timeout: float = 30) -> None:
        assert self._loop is not None and self._stopping is not None  # set before start returns
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the Kubernetes API emulator did not stop")
        if self._failure is not None:
            raise RuntimeError("the Kubernetes API emulator failed") from self._failure


@contextlib.contextmanager
def running_emulator(tmp_dir: Path, *, strict: bool = True) -> Iterator[Cluster]:
    """Serve a fresh, empty emulator on 127.0.0.1 (a free port) for the `with` block; write its kubeconfig.

    With `strict`, leaving the block raises `EmulatorCrashed` if the emulator raised on any request,
    so that its own bugs never pass for the behaviour under test.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    thread = _ServerThread()
    url = thread.start()
    try:
        yield Cluster(kubeconfig=write_kubeconfig(tmp_dir / "kubeconfig", url), url=url, cache_dir=tmp_dir / "kube-cache")
    finally:
        thread.stop()
    assert thread.emulator is not None  # set when started
    if strict and thread.emulator.internal_errors:
        raise EmulatorCrashed(f"the emulator failed on requests: {thread.emulator.internal_errors!r}")
