"""Hand a module's bytes from the publisher to the owner actor through two reusable buffers.

Ray objects die with the process that created them, so the owner must
create them; the bytes get there through shared-memory files. Going
through `ray.put` in the publisher instead would leave that transient copy's
pages resident in the object store (freed objects keep their pages), about
doubling the store's footprint. Two buffers let the publisher fill one while
the owner copies the other into the store, and are unlinked when done.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._manifest import ALIGN as _ALIGN

if TYPE_CHECKING:
    import torch


def layout(sizes: list[int]) -> tuple[list[tuple[int, int]], int]:
    """(offset, nbytes) of each storage in a buffer, 64-byte aligned, and the buffer size."""
    placed, end = [], 0
    for size in sizes:
        placed.append((end, size))
        end += -(-size // _ALIGN) * _ALIGN
    return placed, max(end, 1)


class Spool:
    """Two shared-memory files of `size` bytes, in /dev/shm when it has room."""

    def __init__(self, size: int) -> None:
        folder = _folder(2 * size)
        token = uuid.uuid4().hex[:12]
        self.paths = [str(folder / f"zerocopy-spool-{token}-{i}") for i in range(2)]
        self._maps: list[mmap.mmap] = []
        try:
            for path in self.paths:
                self._maps.append(_create(path, size))
        except BaseException:
            self.close()
            raise

    def fill(self, slot: int, storages: list[torch.Tensor]) -> list[tuple[int, int]]:
        placed, _ = layout([s.numel() for s in storages])
        buffer = np.frombuffer(self._maps[slot], dtype=np.uint8)
        for (offset, size), storage in zip(placed, storages, strict=True):
            buffer[offset : offset + size] = storage.numpy()
        del buffer
        return placed

    def close(self) -> None:
        """Unlink first: an interrupted `fill` may still export a view, and close() would raise."""
        for path in self.paths:
            Path(path).unlink(missing_ok=True)
        for mapped in self._maps:
            with contextlib.suppress(BufferError):
                mapped.close()


def _create(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Reserve the pages now: on a full tmpfs this fails here with ENOSPC instead of
        # killing the process with SIGBUS at the first write.
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def map_file(path: str | Path) -> np.ndarray:
    """A whole file as a read-only byte array, its pages mapped in one call.

    MAP_POPULATE maps the (cached) pages up front: faulting them in one by one
    costs more than copying them.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return np.zeros(0, dtype=np.uint8)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return np.frombuffer(mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ), dtype=np.uint8)


def _folder(needed: int) -> Path:
    """$ZEROCOPY_SPOOL_DIR if set, else /dev/shm when it has room, else the temp folder."""
    if os.environ.get("ZEROCOPY_SPOOL_DIR"):
        return Path(os.environ["ZEROCOPY_SPOOL_DIR"])
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        stats = os.statvfs(shm)
        if stats.f_bavail * stats.f_frsize >= needed:
            return shm
    return Path(tempfile.gettempdir())
