"""An in-memory stand-in for the operator's own I/O seam, `zerocopy_operator.kube.Kube`, and resources to put in it.

The operator's logic talks to Kubernetes only through `Kube`; faking that class (its methods, not the
Kubernetes API) lets unit tests drive every branch of `reconcile`, `clusters` and `handlers` in
milliseconds. The fake keeps the few API behaviours the logic relies on:

- create sets metadata.uid, resourceVersion, generation and creationTimestamp, and refuses a duplicate (409);
- replace is optimistic: a stale or missing resourceVersion fails (409 / 422) instead of losing a change,
  the spec's generation moves only when the spec changed, and the status (a subresource) is kept;
- a get of something missing is None (the real `Kube` maps 404 to None), a delete is idempotent;
- status patches are JSON merge patches (RFC 7386: a key set to None is removed, lists are replaced);
- everything returned is a copy, as every API answer is a fresh object.

It records each call (for "nothing was written" assertions) and can be told to fail a method, with an
ApiException or whatever the client raises when the API server drops the connection. `FakeKube` subclasses
`Kube` so that it type-checks where a `Kube` is expected, but overrides every public method and never calls
`Kube.__init__`: a method it forgot would fail on the missing client instead of reaching a real cluster
(tests/unit/test_reconcile.py checks that it overrides each one with the same signature).
"""

from __future__ import annotations

import copy
import datetime
import itertools
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from kubernetes.client.exceptions import ApiException

from zerocopy_operator.kube import Kube
from zerocopy_operator.manifests import DEPLOYMENT

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "models"
Key = tuple[str, str]
#: The methods that change what the API holds.
WRITES = frozenset(
    {
        "create_rayservice",
        "replace_rayservice",
        "delete_rayservice",
        "patch_model_status",
        "patch_cluster_status",
        "annotate_model",
    }
)

#: uids are unique across every FakeKube of a test run, as a real API server's are across time.
_UIDS = itertools.count(1)


class Call(NamedTuple):
    method: str
    args: tuple[Any, ...]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: what `patch_namespaced_custom_object_status` with a dict body does."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def api_error(status: int, reason: str = "") -> ApiException:
    """An ApiException as the client raises it for an HTTP answer with this status."""
    return ApiException(status=status, reason=reason or {404: "Not Found", 409: "Conflict"}.get(status, "Error"))


class FakeKube(Kube):
    """ZeroCopyModels, ZeroCopyClusters and RayServices in dicts keyed by (namespace, name)."""

    def __init__(self, kuberay: bool = True) -> None:  # no super().__init__(): there is no client to configure
        self.kuberay = kuberay
        self.rayservices: dict[Key, dict[str, Any]] = {}
        self.models: dict[Key, dict[str, Any]] = {}
        self.clusters: dict[Key, dict[str, Any]] = {}
        self.calls: list[Call] = []
        self.events: list[tuple[str, str, str, str]] = []
        #: By method, what each of its next calls does: raise the error, or (None) answer as usual.
        self._failures: dict[str, list[BaseException | None]] = {}
        self._versions = itertools.count(1)

    # Test controls: seeding what the API holds, injecting failures, reading what was called.

    def add(self, *resources: dict[str, Any]) -> None:
        """Store ZeroCopyModels and ZeroCopyClusters, each by its kind."""
        for resource in resources:
            (self.add_cluster if resource["kind"] == "ZeroCopyCluster" else self.add_model)(resource)

    def add_model(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Store a ZeroCopyModel as if `kubectl apply` had created it (no call is recorded); returns the stored copy."""
        return copy.deepcopy(self._store(self.models, resource))

    def add_cluster(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Store a ZeroCopyCluster as if `kubectl apply` had created it (no call is recorded)."""
        return copy.deepcopy(self._store(self.clusters, resource))

    def add_rayservice(self, body: dict[str, Any]) -> dict[str, Any]:
        """Store a RayService made by someone else (no call is recorded)."""
        return copy.deepcopy(self._store(self.rayservices, body))

    def set_rayservice_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """What KubeRay does through the status subresource: the spec and its generation stay."""
        stored = self.rayservices[(namespace, name)]
        stored["status"] = copy.deepcopy(status)
        stored["metadata"]["resourceVersion"] = self._version()

    def fail(self, method: str, error: BaseException | None = None, times: int = 1, after: int = 0) -> None:
        """Make `times` calls of `method` raise `error` (default: a 500 from the API server), once `after` more
        calls of it have been answered as usual."""
        if not callable(getattr(Kube, method, None)) or method.startswith("_"):
            raise AttributeError(f"Kube has no public method {method}")
        plan: list[BaseException | None] = [None] * after + [error or api_error(500, "Internal Server Error")] * times
        self._failures.setdefault(method, []).extend(plan)

    def pending_failures(self) -> dict[str, int]:
        """The failures told but not raised yet, by method: a test that leaves some did not test what it says."""
        return {method: len(plan) for method, plan in self._failures.items() if any(e is not None for e in plan)}

    def called(self, method: str) -> list[tuple[Any, ...]]:
        """The arguments of each call of `method`, in order."""
        return [call.args for call in self.calls if call.method == method]

    def writes(self) -> list[Call]:
        """The calls that changed (or tried to change) what the API holds."""
        return [call for call in self.calls if call.method in WRITES]

    def forget_calls(self) -> None:
        self.calls.clear()

    # The Kube interface.

    def kuberay_installed(self) -> bool:
        self._call("kuberay_installed")
        return self.kuberay

    def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("get_rayservice", namespace, name)
        return copy.deepcopy(self.rayservices.get((namespace, name)))

    def create_rayservice(self, namespace: str, body: dict[str, Any]) -> None:
        self._call("create_rayservice", namespace, body)
        if (namespace, body["metadata"]["name"]) in self.rayservices:
            raise api_error(409, "AlreadyExists")
        if body["metadata"].get("resourceVersion"):
            raise api_error(500, "resourceVersion should not be set on objects to be created")
        self._store(self.rayservices, {**body, "metadata": {**body["metadata"], "namespace": namespace}})

    def delete_rayservice(self, namespace: str, name: str) -> None:
        self._call("delete_rayservice", namespace, name)
        self.rayservices.pop((namespace, name), None)

    def replace_rayservice(self, namespace: str, body: dict[str, Any]) -> None:
        self._call("replace_rayservice", namespace, body)
        key = (namespace, body["metadata"]["name"])
        stored = self.rayservices.get(key)
        if stored is None:
            raise api_error(404)
        version = body["metadata"].get("resourceVersion")
        if not version:  # custom resources allow no unconditional update
            raise api_error(422, "metadata.resourceVersion: must be specified for an update")
        if version != stored["metadata"]["resourceVersion"]:
            raise api_error(409, "the object has been modified; please apply your changes to the latest version")
        meta = copy.deepcopy(body["metadata"])
        for server_owned in ("uid", "creationTimestamp", "generation", "namespace"):
            meta[server_owned] = stored["metadata"][server_owned]
        if body.get("spec") != stored.get("spec"):
            meta["generation"] = stored["metadata"]["generation"] + 1
        meta["resourceVersion"] = self._version()
        replaced = {**copy.deepcopy(body), "metadata": meta}
        replaced.pop("status", None)  # the status subresource is written only through its own endpoint
        if "status" in stored:
            replaced["status"] = stored["status"]
        self.rayservices[key] = replaced

    def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("get_model", namespace, name)
        return copy.deepcopy(self.models.get((namespace, name)))

    def list_models(self, namespace: str) -> list[dict[str, Any]]:
        self._call("list_models", namespace)
        return self._items(self.models, namespace)

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._call("patch_model_status", namespace, name, status)
        self._patch(self.models, namespace, name, {"status": status})

    def get_cluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._call("get_cluster", namespace, name)
        return copy.deepcopy(self.clusters.get((namespace, name)))

    def list_clusters(self, namespace: str) -> list[dict[str, Any]]:
        self._call("list_clusters", namespace)
        return self._items(self.clusters, namespace)

    def patch_cluster_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._call("patch_cluster_status", namespace, name, status)
        self._patch(self.clusters, namespace, name, {"status": status})

    def post_event(self, resource: Mapping[str, Any], type: str, reason: str, message: str, at: str) -> None:
        """Events are kept as (name, type, reason, message), in order."""
        self._call("post_event", resource["metadata"]["name"], type, reason, message)
        self.events.append((resource["metadata"]["name"], type, reason, message))

    def annotate_model(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self._call("annotate_model", namespace, name, annotations)
        self._patch(self.models, namespace, name, {"metadata": {"annotations": annotations}})

    # The API server's side.

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append(Call(method, copy.deepcopy(args)))
        plan = self._failures.get(method)
        error = plan.pop(0) if plan else None
        if error is not None:
            raise error

    def _version(self) -> str:
        return str(next(self._versions))

    def _store(self, kind: dict[Key, dict[str, Any]], resource: dict[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(resource)
        meta = stored["metadata"]
        meta.setdefault("namespace", NAMESPACE)
        meta.setdefault("uid", f"uid-{next(_UIDS)}")  # unique in the process, as uids are in a cluster
        meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = self._version()
        kind[(meta["namespace"], meta["name"])] = stored
        return stored

    def _items(self, kind: dict[Key, dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(kind[key]) for key in sorted(kind) if key[0] == namespace]  # by name, as etcd lists

    def _patch(self, kind: dict[Key, dict[str, Any]], namespace: str, name: str, patch: dict[str, Any]) -> None:
        stored = kind.get((namespace, name))
        if stored is None:
            raise api_error(404)
        patched: dict[str, Any] = merge_patch(stored, patch)
        patched["metadata"]["resourceVersion"] = self._version()
        kind[(namespace, name)] = patched


# Resources to put in it, and an address where nothing answers.


def closed_port() -> int:
    """A loopback port nothing listens on: a connection to it is refused at once (no server, no wait)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model(name: str, created: str = "2026-01-01T00:00:00Z", **serving: Any) -> dict[str, Any]:
    """examples/tiny-mlp.yaml as ZeroCopyModel `name` with a cluster of its own, route /name; `serving` overrides."""
    resource: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-mlp.yaml").read_text())
    resource["metadata"] = {"name": name, "namespace": NAMESPACE, "creationTimestamp": created}
    resource["spec"]["serving"].update({"routePrefix": f"/{name}", **serving})
    return resource


def shared_cluster() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """examples/shared-cluster.yaml: ZeroCopyCluster `shared` and its models `chat` (older) and `minilm`."""
    cluster, chat, minilm = yaml.safe_load_all((ROOT / "examples" / "shared-cluster.yaml").read_text())
    for age, document in enumerate((cluster, chat, minilm)):
        document["metadata"].update(namespace=NAMESPACE, creationTimestamp=f"2026-01-0{age + 1}T00:00:00Z")
    return cluster, chat, minilm


def kuberay_status(apps: dict[str, str], ready: bool = True, upgrading: bool = False) -> dict[str, Any]:
    """A RayService status as KubeRay writes it (see `_play_kuberay` in tests/integration/test_operator.py).

    `apps`: each Serve application's status (RUNNING, DEPLOYING, DEPLOY_FAILED, ...).
    """
    since = "2026-01-01T00:00:00Z"
    conditions = [
        {"type": "Ready", "status": str(ready), "reason": "RayServiceReady" if ready else "Initializing",
         "message": "ready" if ready else "the Ray cluster is starting", "lastTransitionTime": since},
    ]  # fmt: skip
    if upgrading:
        conditions.append(
            {"type": "UpgradeInProgress", "status": "True", "reason": "BothActivePendingClustersExist",
             "message": "upgrading", "lastTransitionTime": since}
        )  # fmt: skip
    statuses = {
        app: {
            "status": state,
            "serveDeploymentStatuses": {DEPLOYMENT: {"status": "HEALTHY"}} if state == "RUNNING" else {},
        }
        for app, state in apps.items()
    }
    return {"conditions": conditions, "activeServiceStatus": {"applicationStatuses": statuses}}
