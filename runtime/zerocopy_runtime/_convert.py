"""Read a checkpoint that only torch reads in a child process, so that the owner never imports torch.

A `.pt`/`.bin` state dict is a pickle, and a GGUF file is dequantized by transformers: both need torch (and
transformers), hundreds of MiB that would stay in the owner, which lives as long as the published copy. The
child loads the checkpoint, writes every storage into one shared-memory file (64-byte aligned) and its records
into another, and exits, giving all of it back; the owner maps the file, copies it into the store as it
copies a safetensors file, and removes it.

    python -m zerocopy_runtime._convert CHECKPOINT RESULT   # what the owner runs
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ._errors import CheckpointError
from ._manifest import TensorRecord
from ._spool import _create, _folder, layout, map_file

__all__ = ["converted"]


@contextmanager
def converted(path: str) -> Iterator[tuple[list[TensorRecord], list[np.ndarray], str]]:
    """The checkpoint's tensor records, its storages as read-only byte arrays and its kind, read by a child
    process; the child's file is removed on leaving."""
    result = Path(_folder(0)) / f"zerocopy-convert-{uuid.uuid4().hex[:12]}"
    done = subprocess.run(
        [sys.executable, "-m", __name__, path, str(result)], capture_output=True, text=True, check=False
    )
    data = Path(f"{result}.bytes")
    try:
        if not result.exists():
            raise CheckpointError(
                f"Reading checkpoint {path!r} failed in its reader process (exit status {done.returncode}): "
                f"{done.stderr.strip()[-2000:] or 'no output'}"
            )
        outcome = pickle.loads(result.read_bytes())
        if isinstance(outcome, BaseException):
            raise outcome
        records, placed, kind = outcome
        buffer = map_file(data)
        yield records, [buffer[offset : offset + size] for offset, size in placed], kind
    finally:
        result.unlink(missing_ok=True)
        data.unlink(missing_ok=True)


def _convert(path: str, result: str) -> None:
    from ._checkpoint import load_mapped
    from ._collect import collect

    try:
        collected = collect(load_mapped(path))
        placed, total = layout([storage.numel() for storage in collected.storages])
        target = np.frombuffer(_create(f"{result}.bytes", total), dtype=np.uint8)
        for (offset, size), storage in zip(placed, collected.storages, strict=True):
            target[offset : offset + size] = storage.numpy()
        outcome: object = (collected.records, placed, collected.kind)
    except CheckpointError as exc:  # the owner raises it as if it had read the file itself
        outcome = exc
    partial = f"{result}.partial"
    with open(partial, "wb") as file:
        pickle.dump(outcome, file)
    os.rename(partial, result)  # the result appears whole, or not at all


if __name__ == "__main__":
    _convert(sys.argv[1], sys.argv[2])
