"""What a resource says, read once for everyone: its typed spec, its route, the RayService it runs in and its
URL, the worker pod with the most room. Pure functions, imported by builders, checks and status alike."""

from __future__ import annotations

from typing import Any

from . import quantity
from .api import Cluster, ZeroCopyClusterSpec, ZeroCopyModelSpec

__all__ = [
    "SERVE_PORT",
    "endpoint",
    "largest_worker",
    "parse_cluster_spec",
    "parse_spec",
    "route_prefix",
    "serve_url",
    "service_name",
]

SERVE_PORT = 8000


def parse_spec(resource: dict[str, Any]) -> ZeroCopyModelSpec:
    """The typed spec; a pydantic ValidationError names every bad field."""
    return ZeroCopyModelSpec.model_validate(resource.get("spec") or {})


def parse_cluster_spec(resource: dict[str, Any]) -> ZeroCopyClusterSpec:
    """A ZeroCopyCluster's typed spec; a pydantic ValidationError names every bad field."""
    return ZeroCopyClusterSpec.model_validate(resource.get("spec") or {})


def route_prefix(resource: dict[str, Any], spec: ZeroCopyModelSpec) -> str:
    return spec.serving.route_prefix or f"/{resource['metadata']['name']}"


def service_name(resource: dict[str, Any], spec: ZeroCopyModelSpec) -> str:
    """The RayService a model runs in: its own, or its ZeroCopyCluster's (each takes its owner's name)."""
    return spec.cluster_ref.name if spec.cluster_ref is not None else str(resource["metadata"]["name"])


def serve_url(namespace: str, rayservice: str) -> str:
    """The Serve service KubeRay creates for a RayService, in the cluster's DNS."""
    return f"http://{rayservice}-serve-svc.{namespace}.svc:{SERVE_PORT}"


def endpoint(resource: dict[str, Any], spec: ZeroCopyModelSpec) -> str:
    """The model's in-cluster URL: its route on the Serve service of the RayService it runs in."""
    base = serve_url(resource["metadata"]["namespace"], service_name(resource, spec))
    return base + route_prefix(resource, spec)


def largest_worker(cluster: Cluster) -> tuple[int, float, int]:
    """The most GPUs, CPUs and object-store bytes any one worker pod has."""
    return (
        max(g.gpus for g in cluster.worker_groups),
        max(float(quantity.parse(g.cpu)) for g in cluster.worker_groups),
        max(quantity.to_bytes(g.object_store_memory) for g in cluster.worker_groups),
    )
