"""Errors a user can act on: each message names the problem and the fix."""

from __future__ import annotations


class ZeroCopyError(Exception):
    """Base class for every error raised by zerocopy_runtime."""


class UnsupportedWeightsError(ZeroCopyError, TypeError):
    """A tensor cannot be shared byte-for-byte (quantized, sparse, meta, subclass, TorchScript).

    Raised instead of silently copying or densifying, because a silent copy
    would defeat the one-copy-per-node promise without anyone noticing.
    """


class ObjectStoreFullError(ZeroCopyError, MemoryError):
    """The local object store has too little free memory for the weights."""


class CheckpointError(ZeroCopyError, ValueError):
    """A checkpoint is missing, unreadable, or does not match the architecture."""


class WeightsNotFoundError(ZeroCopyError, LookupError):
    """No published weights exist under the requested name (never published, or released)."""


class AlreadyPublishedError(ZeroCopyError):
    """Another publisher holds the name: wait for its copy (`lookup`) instead of publishing a second one."""


class PublishInProgressError(WeightsNotFoundError):
    """The owner exists but is still copying the weights into the store; its copy is usable once sealed."""


class SettingError(ZeroCopyError, ValueError):
    """A setting names something the runtime cannot find (a factory, a handler, a transformers class)."""
