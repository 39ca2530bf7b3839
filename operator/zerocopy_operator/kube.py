"""The few Kubernetes API calls the operator makes, in one place.

Everything else is pure; this module is the I/O seam. It uses the official
client, configured in-cluster or from KUBECONFIG, exactly like kopf itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .api import CLUSTER_PLURAL, GROUP, PLURAL, VERSION

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayservices"
KUBERAY_CRD = f"{RAY_PLURAL}.{RAY_GROUP}"


class Kube:
    """Typed-enough access to ZeroCopyModels, ZeroCopyClusters, RayServices and CRDs."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    def kuberay_installed(self) -> bool:
        """Asks API discovery, not the CRD itself: reading CRDs needs a ClusterRole, discovery needs none."""
        try:
            found: Any = self._custom.get_api_resources(RAY_GROUP, RAY_VERSION)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return any(resource.name == RAY_PLURAL for resource in found.resources)

    def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: Any = self._custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def create_rayservice(self, namespace: str, body: dict[str, Any]) -> None:
        self._custom.create_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, body)

    def delete_rayservice(self, namespace: str, name: str) -> None:
        """Gone already is fine: the garbage collector or a person may have been first."""
        try:
            self._custom.delete_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def replace_rayservice(self, namespace: str, body: dict[str, Any]) -> None:
        """PUT with the caller's resourceVersion: a concurrent change fails with 409 instead of being lost."""
        name = body["metadata"]["name"]
        self._custom.replace_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name, body)

    def get_model(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(PLURAL, namespace, name)

    def list_models(self, namespace: str) -> list[dict[str, Any]]:
        return self._list(PLURAL, namespace)

    def patch_model_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})

    def get_cluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(CLUSTER_PLURAL, namespace, name)

    def list_clusters(self, namespace: str) -> list[dict[str, Any]]:
        return self._list(CLUSTER_PLURAL, namespace)

    def patch_cluster_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, CLUSTER_PLURAL, name, {"status": status}
        )

    def _get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: Any = self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def _list(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        listed: Any = self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        items: list[dict[str, Any]] = listed.get("items", [])
        return items

    def post_event(self, resource: Mapping[str, Any], type: str, reason: str, message: str, at: str) -> None:
        """A core/v1 Event about `resource`, as kopf posts them (the work queue runs outside kopf's handlers)."""
        meta = resource["metadata"]
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": resource.get("apiVersion"),
                "kind": resource.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "zerocopy-operator"},
            "firstTimestamp": at,
            "lastTimestamp": at,
            "count": 1,
        }
        self._core.create_namespaced_event(meta["namespace"], body)  # type: ignore[arg-type]  # a dict serves

    def annotate_model(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        self._custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"annotations": annotations}}
        )


class IndexedKube:
    """A `Kube` whose listings of models and clusters come from kopf's watch-fed indexes, not the API server.

    Every reconcile reads its namespace's models (route checks, cluster planning); listing them from the API
    server made the operator's work grow with the square of the models (`bench/bench_operator.py`). Every
    other call goes to the API.
    """

    def __init__(
        self,
        kube: Kube,
        models: Mapping[str, Iterable[Mapping[str, Any]]],
        clusters: Mapping[str, Iterable[Mapping[str, Any]]],
    ) -> None:
        self._kube, self._models, self._clusters = kube, models, clusters

    def list_models(self, namespace: str) -> list[dict[str, Any]]:
        return [dict(model) for model in self._models.get(namespace, ())]

    def list_clusters(self, namespace: str) -> list[dict[str, Any]]:
        return [dict(cluster) for cluster in self._clusters.get(namespace, ())]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kube, name)
