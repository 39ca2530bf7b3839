"""A stateful Kubernetes API emulator on 127.0.0.1, good enough for the real `kopf run` and `/usr/bin/kubectl`.

No cluster can run on the test machines, so integration tests talk to this instead: kmock's
`KubernetesEmulator` (HTTP serving, reactions, object history) extended where kmock 0.8 falls short of what
kopf and kubectl rely on. `KubeApiEmulator` routes requests; the rules live by concern:

- `_store`: server-owned metadata (uid, resourceVersion, creationTimestamp, generation), the status
  subresource, optimistic concurrency (409), finalizers, owner-reference / namespace / CRD cascades;
- `_patches`: merge, strategic-merge (as merge), JSON patch (422 on a failed `test` op);
- `_apply`: server-side apply with field ownership (managedFields, conflicts, dropped fields removed);
- `_watch`: watches resumable from any `resourceVersion`; `_selectors`: label and field selectors;
- `_discovery`: built-in resources, CRD resources appearing and vanishing, preferred versions;
- `_http`, `_protobuf`, `_errors`: paths and bodies as kubectl sends them, `kind: Status` errors.

Tests use `running_emulator`, which serves a fresh emulator in a background thread and yields a `Cluster`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
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

from tests.kube import _apply, _discovery, _errors, _http, _patches, _selectors, _tables
from tests.kube._admission import WriteOptions
from tests.kube._store import ObjectKey, Store, api_version

KUBECTL = "/usr/bin/kubectl"

#: The namespaces a new cluster has. kopf serves only namespaces that exist as objects.
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

Predicate = Callable[[Mapping[str, Any]], bool]

logger = logging.getLogger(__name__)


@attrs.define(kw_only=True)
class KubeApiEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the API server behaviour that kopf and kubectl depend on."""

    _store: Store = attrs.field(init=False)
    #: Exceptions the emulator raised on requests: bugs here, 500s a real API server would not return.
    internal_errors: list[BaseException] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for resource, info in _discovery.builtin_resources().items():
            self.resources[resource] = info
        self._store = Store(objects=self.objects, resources=self.resources)
        namespaces = self.resources[_discovery.NAMESPACES]
        for name in INITIAL_NAMESPACES:
            self._store.create(_discovery.NAMESPACES, namespaces, None, {"metadata": {"name": name}})
        self.fallback["put"] << self._serve_replace
        # kubectl apply validates against the OpenAPI v2 schema when /openapi/v3 is missing (404, tolerated):
        # an empty protobuf document is a valid one with no schemas, so every object passes.
        self.fallback["get /openapi/v2"] << b""

    @property
    def requests(self) -> list[kmock.Request]:
        """Every request served so far, in order (a live list): what each client actually asked for."""
        return self._requests

    def close_watches(self) -> None:
        """End the open watch responses (e.g. before shutdown: the server waits for open requests)."""
        self._store.log.close()

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
            cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            self._record_internal_error(cause)
            raw_response: aiohttp.web.StreamResponse = exc.args[0]
            await self._stream_error(cause, raw_response)
            await raw_response.write_eof()
            return raw_response
        except Exception as exc:
            self._record_internal_error(exc)
            return await self._render_error(exc)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # KubernetesEmulator._handle writes to kmock's store before dispatching, without any of the metadata
        # rules; here the _serve_* reactions make every change, so dispatch to the reactions straight away.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    def _record_internal_error(self, exc: Exception) -> None:
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

    def _declared(self) -> dict[kmock.resource, kmock.ResourceInfo]:
        """kmock's `resources`, typed as what it holds (its declared key type is wider: it parses strings too)."""
        return {resource: self.resources[resource] for resource in self.resources}

    def _get_resources(self) -> list[kmock.resource]:
        """Only what is declared is served (kmock also serves resources of stored objects, even deleted ones)."""
        return list(self._declared())

    async def _serve_server_version(self, request: kmock.Request) -> kmock.Payload:
        return _discovery.SERVER_VERSION

    async def _serve_apis(self, request: kmock.Request) -> kmock.Payload:
        """kmock picks an arbitrary preferred version; kubectl must get v1 for ray.io, not v1alpha1."""
        versions: dict[str, set[str]] = collections.defaultdict(set)
        for resource in self.resources:
            if resource.group:
                versions[resource.group].add(str(resource.version))
        groups = [_discovery.api_group(group, versions[group]) for group in sorted(versions)]
        return {"apiVersion": "v1", "kind": "APIGroupList", "groups": groups}

    async def _serve_group(self, request: kmock.Request) -> kmock.Payload:
        group = request.resource.group if request.resource is not None else None
        versions = {str(resource.version) for resource in self.resources if group and resource.group == group}
        if not group or not versions:
            raise _errors.unknown_resource()
        return {"apiVersion": "v1", "kind": "APIGroup", **_discovery.api_group(group, versions)}

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None  # routed here by its /api/<version> or /apis/<group>/<version> path
        group, version = request.resource.group or "", str(request.resource.version)
        if not any((resource.group, resource.version) == (group, version) for resource in self.resources):
            raise _errors.unknown_resource()
        return _discovery.api_resource_list(group, version, self._declared())

    # -- addressing ------------------------------------------------------------------------------------------

    def _served(self, request: kmock.Request) -> tuple[kmock.resource, kmock.ResourceInfo]:
        """The addressed resource and its discovery info; 404 wherever a real server has no route."""
        resource = request.resource
        if resource is None or resource.plural is None or resource not in self.resources:
            raise _errors.unknown_resource()
        info = self.resources[resource]
        scoped_wrongly = request.namespace is not None and not info.namespaced
        unnamespaced_object = info.namespaced and request.namespace is None and request.name is not None
        if scoped_wrongly or unnamespaced_object or request.subresource not in {None, *info.subresources}:
            raise _errors.unknown_resource()
        return resource, info

    def _addressed(self, request: kmock.Request) -> tuple[ObjectKey, kmock.ResourceInfo]:
        """The key of the object a request names (in its URL), and its resource's discovery info."""
        resource, info = self._served(request)
        if request.name is None:
            raise _errors.bad_request("the request must name an object")
        return (resource, request.namespace if info.namespaced else None, request.name), info

    def _selection(self, request: kmock.Request) -> Predicate:
        """Which objects a list or watch request is about: its namespace, name, label and field selectors."""
        selected = _selectors.selected(request.params)

        def matches(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata", {})
            in_namespace = request.namespace is None or meta.get("namespace") == request.namespace
            named = request.name is None or meta.get("name") == request.name
            return in_namespace and named and selected(obj)

        return matches

    @staticmethod
    def _object_body(request: kmock.Request) -> dict[str, Any]:
        body = _http.decode_body(request.body, request.headers)
        if not isinstance(body, dict):
            raise _errors.bad_request("the request body must be an object")
        body.setdefault("metadata", {})
        return body

    # -- the verbs -------------------------------------------------------------------------------------------

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        resource, info = self._served(request)
        body = self._object_body(request)
        meta = body["metadata"]
        if request.namespace and meta.setdefault("namespace", request.namespace) != request.namespace:
            raise _errors.bad_request("the namespace of the object does not match the namespace on the request")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise _errors.invalid("metadata.name: Required value: name or generateName is required")
        namespace = (meta.get("namespace") or "default") if info.namespaced else None
        options = WriteOptions.from_params(request.params, request.headers.get("User-Agent", ""))
        created = self._store.create(resource, info, namespace, body, options)
        self._store.collect_if_orphaned((resource, namespace, created["metadata"]["name"]))
        return _written(201, created, options)

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        key, _ = self._addressed(request)
        obj = self._store.existing(key)
        columns = self._printer_columns(request)
        if columns is not None:
            return _tables.table(
                columns, [obj], obj["metadata"]["resourceVersion"], request.params.get("includeObject", "")
            )
        return obj

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        """A `<Kind>List` with the `resourceVersion` to watch from (kubectl needs the kind, kopf the version)."""
        resource, info = self._served(request)
        matches = self._selection(request)
        items = [obj for _, obj in self._store.live_objects(resource) if matches(obj)]
        version = str(self._store.last_resource_version)
        columns = self._printer_columns(request)
        if columns is not None:
            return _tables.table(columns, items, version, request.params.get("includeObject", ""))
        return {
            "apiVersion": api_version(resource),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": version},
            "items": items,
        }

    def _printer_columns(self, request: kmock.Request) -> dict[str, Any] | None:
        """The CRD version whose printer columns a Table answer uses; None to answer with objects.

        Built-in kinds are always answered with objects: kubectl prints those with its own columns.
        """
        if request.resource is None or not _tables.wants_table(request.headers.get("Accept", "")):
            return None
        return self._store.crd_version(request.resource)

    async def _serve_watch(self, request: kmock.Request) -> kmock.Payload:  # type: ignore[override]
        """JSON events, one a line, newer than `resourceVersion`; with none or "0", the current objects first.

        `timeoutSeconds` ends the stream; `allowWatchBookmarks` is accepted and no bookmarks are sent.
        kmock's returns the bare stream, which it serves as `application/octet-stream`: kubectl rejects that.
        """
        resource, _ = self._served(request)
        matches = self._selection(request)
        since = request.params.get("resourceVersion", "")
        timeout = request.params.get("timeoutSeconds", "")
        if any(value and not value.isdigit() for value in (since, timeout)):
            raise _errors.bad_request("resourceVersion and timeoutSeconds must be whole numbers")
        initial: list[dict[str, Any]] = []
        if since in {"", "0"}:
            initial = [obj for _, obj in self._store.live_objects(resource) if matches(obj)]
            since = str(self._store.last_resource_version)
        events = self._watch_events(resource, matches, initial, int(since), float(timeout) if timeout else None)
        columns = self._printer_columns(request)
        if columns is not None:
            events = _as_tables(events, columns, request.params.get("includeObject", ""))
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
        async for event in self._store.log.follow(since, timeout):
            if event.resource == resource and matches(event.object):
                yield {"type": event.type, "object": event.object}

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        """PATCH in any of the API server's patch types; server-side apply creates a missing object."""
        key, info = self._addressed(request)
        patch_type = _http.content_type(request.headers)
        accepted = _patches.accepted_patch_types(custom=self._store.crd_version(key[0]) is not None)
        if patch_type not in accepted:
            raise _errors.unsupported_media_type(patch_type, accepted)
        patch = _http.decode_body(request.body, request.headers)
        options = WriteOptions.from_params(request.params, request.headers.get("User-Agent", ""))
        current = self._store.live(key)
        if current is None and patch_type == _patches.APPLY_PATCH and request.subresource is None:
            return _written(201, self._create_applied(key, info, patch, options), options)
        if current is None:
            raise _errors.not_found(key[0], key[2])
        if patch_type == _patches.APPLY_PATCH:
            schema = self._store.schema(key[0])
            proposed = _apply.apply(
                key[0], current, patch, schema, options.field_manager, options.force, request.subresource
            )
            options.applied = True
        else:
            proposed = _patches.apply_patch(current, patch_type, patch)
        updated = self._store.update(key, info, current, proposed, request.subresource, options)
        return _written(200, updated, options)

    def _create_applied(
        self, key: ObjectKey, info: kmock.ResourceInfo, patch: Any, options: WriteOptions
    ) -> dict[str, Any]:
        """Server-side apply of a missing object creates it, named and scoped by the URL."""
        if not isinstance(patch, dict):
            raise _errors.bad_request("an apply patch must be an object")
        resource, namespace, name = key
        meta = patch.setdefault("metadata", {})
        if meta.setdefault("name", name) != name or meta.setdefault("namespace", namespace) != namespace:
            raise _errors.bad_request("the name or namespace of the object does not match the request's")
        applied = _apply.apply(resource, None, patch, self._store.schema(resource), options.field_manager, True, None)
        options.applied = True
        return self._store.create(resource, info, namespace, applied, options)

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        """PUT: a whole new object, conditional on its `resourceVersion` if it carries one (409 if stale)."""
        key, info = self._addressed(request)
        body = self._object_body(request)
        if body["metadata"].get("name", key[2]) != key[2]:
            raise _errors.bad_request("the name of the object does not match the name on the URL")
        options = WriteOptions.from_params(request.params, request.headers.get("User-Agent", ""))
        updated = self._store.update(key, info, self._store.existing(key), body, request.subresource, options)
        return _written(200, updated, options)

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        """The object while finalizers hold it (with `deletionTimestamp`), else a Success status."""
        key, _ = self._addressed(request)
        options = request.data if isinstance(request.data, dict) else {}
        propagation = request.params.get("propagationPolicy") or options.get("propagationPolicy") or "Background"
        if options.get("orphanDependents") is True or request.params.get("orphanDependents") == "true":
            propagation = "Orphan"
        remaining = self._store.delete(key, self._store.existing(key), propagation)
        if remaining is not None:
            return remaining
        resource, _, name = key
        details = {"name": name, "group": resource.group, "kind": resource.plural}
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success", "details": details}


async def _as_tables(
    events: AsyncIterator[kmock.Payload], crd_version: dict[str, Any], include: str
) -> AsyncIterator[kmock.Payload]:
    """Watch events whose objects are one-row Tables, as the API server sends them to `kubectl get --watch`."""
    async for event in events:
        if isinstance(event, dict):
            obj = event["object"]
            version = obj.get("metadata", {}).get("resourceVersion", "")
            yield {**event, "object": _tables.table(crd_version, [obj], version, include)}
        else:
            yield event


def _written(status: int, obj: dict[str, Any], options: WriteOptions) -> kmock.Response:
    """The response to a write, with its warnings (pruned fields) as the API server's `Warning` headers.

    Always with an explicit status: kmock 0.8 keeps the status of a returned Response on the reaction for
    the requests that follow (after a 201 from an apply that created, updates must say 200).
    """
    headers = (
        {"Warning": ", ".join(f"299 - {json.dumps(text)}" for text in options.warnings)} if options.warnings else {}
    )
    return kmock.Response(status=status, payload=obj, headers=headers)


@attrs.frozen
class Cluster:
    """A Kubernetes API as tests reach it: a kubeconfig (for kopf and the real kubectl) and its server URL."""

    kubeconfig: Path
    url: str
    #: kubectl's discovery cache, one per cluster: a later emulator on the same port must not see stale groups.
    cache_dir: Path
    #: The emulator's request log (None for a real cluster): tells clients apart by their bearer token.
    requests: list[kmock.Request] | None = None

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


def write_kubeconfig(path: Path, url: str, token: str = "emulator-token") -> Path:
    """A kubeconfig for `url` with a dummy token: the emulator accepts every request, and logs the token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {"token": token}}],
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
        assert self._loop is not None  # set before start returns
        assert self._stopping is not None
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the Kubernetes API emulator did not stop")
        if self._failure is not None:
            raise RuntimeError("the Kubernetes API emulator failed") from self._failure


@contextlib.contextmanager
def running_emulator(tmp_dir: Path, *, strict: bool = True) -> Iterator[Cluster]:
    """Serve a fresh emulator on 127.0.0.1 (a free port) for the `with` block; its kubeconfig goes in `tmp_dir`.

    With `strict`, leaving the block raises `EmulatorCrashed` if the emulator raised on any request,
    so that its own bugs never pass for the behaviour under test.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    thread = _ServerThread()
    url = thread.start()
    kubeconfig = write_kubeconfig(tmp_dir / "kubeconfig", url)
    try:
        assert thread.emulator is not None  # set when started
        yield Cluster(
            kubeconfig=kubeconfig, url=url, cache_dir=tmp_dir / "kube-cache", requests=thread.emulator.requests
        )
    finally:
        thread.stop()
    assert thread.emulator is not None  # set when started
    if strict and thread.emulator.internal_errors:
        raise EmulatorCrashed(f"the emulator failed on requests: {thread.emulator.internal_errors!r}")
