"""Where tests find KubeRay's CRDs: `$ZEROCOPY_KUBERAY_CRDS`, else `../shared/kuberay-crds` beside the repository.

They are not vendored (KubeRay's, 1.7.0, megabytes); `script/fetch_kuberay_crds.py` fetches them from
KubeRay's Helm chart into the default place. Tests that need them skip with `MISSING` when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "ZEROCOPY_KUBERAY_CRDS"
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"


def crds_dir() -> Path:
    """The folder of `ray.io_<plural>.yaml` files the tests use."""
    configured = os.environ.get(ENV)
    return Path(configured).expanduser() if configured else DEFAULT_DIR


def crd(plural: str = "rayservices") -> Path:
    """The CRD file of one KubeRay resource, e.g. `crd("rayservices")`."""
    return crds_dir() / f"ray.io_{plural}.yaml"


def missing() -> str | None:
    """Why the tests cannot use KubeRay's CRDs (a skip reason), or None when the RayService CRD is there."""
    if crd().is_file():
        return None
    return (
        f"KubeRay's CRDs are not in {crds_dir()}: run script/fetch_kuberay_crds.py, "
        f"or set {ENV} to a folder holding ray.io_rayservices.yaml"
    )
