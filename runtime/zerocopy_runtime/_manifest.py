"""The small, picklable description of published weights.

The manifest travels to every attaching process; the bytes never do. It is
plain data (no torch objects) so that it pickles in microseconds and can be
inspected or logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Storages start on this boundary in spool buffers and in the store: every dtype is aligned.
ALIGN = 64

#: Every dtype is stored as raw bytes; its name (torch's, without "torch.") and the bytes of one element. Plain
#: data, so that a process that only copies bytes (the owner of a safetensors checkpoint) never imports torch;
#: `_dtypes.DTYPES` maps the names to torch dtypes where tensors are built.
ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
}  # fmt: skip


@dataclass(frozen=True)
class StorageRecord:
    """One run of bytes: buffer `index` inside store object `chunk`."""

    chunk: int
    index: int
    nbytes: int


@dataclass(frozen=True)
class TensorRecord:
    """One tensor object, viewed into a storage.

    `names` holds every state-dict name that refers to this very tensor object
    (tied weights), so ties survive the round trip as `a is b`.
    `storage_offset` is in elements, relative to the published (trimmed) storage.
    """

    names: tuple[str, ...]
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    storage: int
    is_parameter: bool
    requires_grad: bool
    persistent: bool

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Manifest:
    """Everything needed to rebuild tensors from the store objects.

    `skeleton` is the pickled model or pipeline with every tensor replaced by a
    reference into `tensors`; it is None when only a state dict was published
    (a checkpoint), in which case the architecture comes from a factory.
    """

    tensors: tuple[TensorRecord, ...]
    storages: tuple[StorageRecord, ...]
    chunk_count: int
    skeleton: bytes | None = None
    kind: str = "module"
    metadata: dict[str, str] = field(default_factory=dict)
    #: Seconds spent copying the bytes into the store (owner start-up excluded).
    publish_seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes held in the store (unique storages, without padding)."""
        return sum(s.nbytes for s in self.storages)

    def by_name(self) -> dict[str, int]:
        """Map every name (aliases included) to its tensor index."""
        return {name: i for i, rec in enumerate(self.tensors) for name in rec.names}
