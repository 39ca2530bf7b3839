"""Kubernetes operator for ZeroCopyModel resources: each becomes a KubeRay RayService.

`api` holds the resource's types (the CRD is generated from them),
`manifests` the pure builders, `validation` the semantic checks, `reconcile`
the steps of one reconciliation, `handlers` the kopf registrations.
"""

from .api import ZeroCopyModelSpec, ZeroCopyModelStatus
from .crd import build_crd
from .manifests import build_rayservice
from .validation import InvalidSpec, validate

__all__ = ["InvalidSpec", "ZeroCopyModelSpec", "ZeroCopyModelStatus", "build_crd", "build_rayservice", "validate"]
