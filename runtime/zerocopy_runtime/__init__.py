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
    from .engines import Engine
    from .memory import pss_bytes, total_pss
    from .replica_weights import ReplicaWeights, find_or_publish, model_files, release_model
    from .serve import build_app
    from .tensor_codec import BadRequest, Handler
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
    ".tensor_codec": ["BadRequest", "Handler"],
    ".memory": ["pss_bytes", "total_pss"],
    ".engines": ["Engine"],
    ".replica_weights": ["ReplicaWeights", "find_or_publish", "model_files", "release_model"],
    ".serve": ["build_app"],
    ".weights": ["AttachReport", "PublishedModel", "attach", "attach_report", "lookup", "publish", "release"],
    ".wrapper": ["ModelWrapper", "TaskModel"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "AppArgs",
    "AttachReport",
    "BadRequest",
    "CheckpointError",
    "Engine",
    "Handler",
    "ModelWrapper",
    "ObjectStoreFullError",
    "PublishedModel",
    "ReplicaInfo",
    "ReplicaWeights",
    "TaskModel",
    "UnsupportedWeightsError",
    "WeightsNotFoundError",
    "ZeroCopyError",
    "attach",
    "attach_report",
    "build_app",
    "find_or_publish",
    "lookup",
    "model_files",
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
