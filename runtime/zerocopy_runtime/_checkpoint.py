"""Read checkpoints as tensors backed by the file's pages, never by process heap.

Safetensors headers are parsed here rather than through `safe_open`, because
we need each tensor's byte range to memory-map it in place; the format is a
fixed 8-byte length, a JSON header, then raw little-endian bytes.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from ._errors import CheckpointError
from ._spool import map_file

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files of a checkpoint: one file, or every shard in a directory."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"Checkpoint {str(root)!r} does not exist; check the path (and that it is on this node).")
    if root.is_file():
        return [root]
    files = sorted(root.glob("*.safetensors")) or sorted([*root.glob("*.pt"), *root.glob("*.pth"), *root.glob("*.bin")])
    if not files:
        raise CheckpointError(f"Directory {str(root)!r} holds no *.safetensors, *.pt, *.pth or *.bin checkpoint files.")
    return files


def load_mapped(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (file or shard directory), mapped from disk."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        part = _load_safetensors(file) if file.suffix == ".safetensors" else _load_torch(file)
        duplicate = tensors.keys() & part.keys()
        if duplicate:
            raise CheckpointError(f"Tensor {sorted(duplicate)[0]!r} appears in more than one shard of {str(path)!r}.")
        tensors.update(part)
    return tensors


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > file.stat().st_size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size")
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, ValueError) as exc:  # JSON and Unicode errors are ValueErrors
        raise CheckpointError(f"Cannot read safetensors header of {str(file)!r}: {exc}. Is the file complete?") from exc
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    size = file.stat().st_size
    raw = map_file(file)
    tensors = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, info in header.items():
            try:
                tensors[name] = _tensor_at(raw, data_start, size, info)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"Tensor {name!r} in {str(file)!r}: {exc}") from exc
    return tensors


def _tensor_at(raw: np.ndarray, data_start: int, size: int, info: dict) -> torch.Tensor:
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported dtype {info['dtype']}")
    begin, end = (data_start + o for o in info["data_offsets"])
    if end > size:
        raise ValueError("its bytes run past the end of the file: the file is truncated")
    raw_bytes = torch.from_numpy(raw[begin:end]) if end > begin else torch.empty(0, dtype=torch.uint8)
    return raw_bytes.view(dtype).reshape(info["shape"])


def _load_torch(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(
            f"Cannot load {str(file)!r} as a torch state dict ({type(exc).__name__}: {exc}). "
            "Save it with torch.save(model.state_dict(), path) or use safetensors."
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(file)!r} does not hold a state dict of tensors (name -> tensor).")
    return state
