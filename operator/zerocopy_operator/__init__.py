"""Kubernetes operator for ZeroCopyModel resources: each becomes a KubeRay RayService, or one application of
the RayService of the ZeroCopyCluster it names.

`api` holds the resources' types (the CRDs are generated from them),
`resources` what a resource says (spec, route, URL), `manifests` the pure
builders, `validation` the semantic checks, `placement` the checks across a
cluster's models, `reconcile` and `clusters` the steps of one reconciliation,
`handlers` the kopf registrations.
"""

from .api import ZeroCopyClusterSpec, ZeroCopyClusterStatus, ZeroCopyModelSpec, ZeroCopyModelStatus
from .crd import build_crd
from .manifests import build_cluster_rayservice, build_rayservice
from .validation import InvalidSpec, validate, validate_cluster

__all__ = [
    "InvalidSpec",
    "ZeroCopyClusterSpec",
    "ZeroCopyClusterStatus",
    "ZeroCopyModelSpec",
    "ZeroCopyModelStatus",
    "build_cluster_rayservice",
    "build_crd",
    "build_rayservice",
    "validate",
    "validate_cluster",
]
