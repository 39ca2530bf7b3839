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
    from .memory import pss_bytes, total_pss
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
    ".memory": ["pss_bytes", "total_pss"],
    ".weights": ["AttachReport", "PublishedModel", "attach", "attach_report", "lookup", "publish", "release"],
    ".wrapper": ["ModelWrapper", "TaskModel"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "AttachReport",
    "CheckpointError",
    "ModelWrapper",
    "ObjectStoreFullError",
    "PublishedModel",
    "TaskModel",
    "UnsupportedWeightsError",
    "WeightsNotFoundError",
    "ZeroCopyError",
    "attach",
    "attach_report",
    "lookup",
    "pss_bytes",
    "publish",
    "release",
    "total_pss",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
