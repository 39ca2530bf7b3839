"""Share PyTorch weights across Ray workers: published once per node, attached zero-copy.

The public names load on first use, so that `zerocopy_runtime.config` (pydantic
only) can be imported by the operator, whose image has neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._errors import (
        CheckpointError,
        ObjectStoreFullError,
        UnsupportedWeightsError,
        WeightsNotFoundError,
        ZeroCopyError,
    )
    from ._owner import published_names
    from .config import AppArgs
    from .contract import ReplicaInfo
    from .handlers import BadRequest, Handler
    from .memory import pss_bytes, total_pss
    from .serve import build_app, release_model
    from .weights import AttachReport, PublishedModel, attach, attach_report, lookup, publish, release
    from .wrapper import ModelWrapper, TaskModel

_HOMES = {
    "._errors": [
        "CheckpointError",
        "ObjectStoreFullError",
        "UnsupportedWeightsError",
        "WeightsNotFoundError",
        "ZeroCopyError",
    ],
    "._owner": ["published_names"],
    ".config": ["AppArgs"],
    ".contract": ["ReplicaInfo"],
    ".handlers": ["BadRequest", "Handler"],
    ".memory": ["pss_bytes", "total_pss"],
    ".serve": ["build_app", "release_model"],
    ".weights": ["AttachReport", "PublishedModel", "attach", "attach_report", "lookup", "publish", "release"],
    ".wrapper": ["ModelWrapper", "TaskModel"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "AppArgs",
    "AttachReport",
    "BadRequest",
    "CheckpointError",
    "Handler",
    "ModelWrapper",
    "ObjectStoreFullError",
    "PublishedModel",
    "ReplicaInfo",
    "TaskModel",
    "UnsupportedWeightsError",
    "WeightsNotFoundError",
    "ZeroCopyError",
    "attach",
    "attach_report",
    "build_app",
    "lookup",
    "pss_bytes",
    "publish",
    "published_names",
    "release",
    "release_model",
    "total_pss",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
