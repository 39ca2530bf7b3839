"""Share PyTorch weights across Ray workers: published once per node, attached zero-copy."""

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
