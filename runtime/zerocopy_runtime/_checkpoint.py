"""Read checkpoints as tensors backed by the file's pages, never by process heap.

Safetensors headers are parsed here rather than through `safe_open`, because
we need each tensor's byte range to memory-map it in place; the format is a
fixed 8-byte length, a JSON header, then raw little-endian bytes. The layout
(`safetensors_layout`) needs no torch: the owner of a published copy reads it
and copies the bytes as bytes, so it never pays for importing torch.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import CheckpointError
from ._gguf import meant_as_gguf
from ._manifest import ITEMSIZE
from ._spool import map_file

if TYPE_CHECKING:
    import torch

#: safetensors' dtype names -> the manifest's (torch's names).
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64", "I64": "int64", "I32": "int32", "I16": "int16",
    "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: its name, dtype (the manifest's name), shape and byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int


#: Weight files by format, in the order one is preferred when a folder holds more than one.
WEIGHT_FORMATS = ((".safetensors",), (".pt", ".pth", ".bin"))


def weight_files(names: Iterable[str]) -> list[str]:
    """A folder's weights, from the names of its files: its safetensors shards, else its torch state dicts
    (hub repositories often carry both, and other formats beside; safetensors win). The one rule, for local
    folders and remote ones alike."""
    ordered = sorted(names)
    for suffixes in WEIGHT_FORMATS:
        chosen = [name for name in ordered if name.endswith(suffixes)]
        if chosen:
            return chosen
    return []


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files of a checkpoint: one file, or every shard in a directory."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"Checkpoint {str(root)!r} does not exist; check the path (and that it is on this node).")
    if root.is_file():
        return [root]  # safetensors, a torch state dict, or a GGUF file
    files = [root / name for name in weight_files(p.name for p in root.iterdir() if p.is_file())]
    if not files:
        raise CheckpointError(f"Directory {str(root)!r} holds no *.safetensors, *.pt, *.pth or *.bin checkpoint files.")
    return files


def safetensors_layout(path: str | Path) -> list[SafetensorsEntry] | None:
    """Every tensor of a safetensors checkpoint (file or shard directory), in file and header order; None when
    the checkpoint is a torch state dict (`.pt`, `.pth`, `.bin`), whose layout only torch can read."""
    files = checkpoint_files(path)
    if any(file.suffix != ".safetensors" for file in files):
        return None
    entries: list[SafetensorsEntry] = []
    seen: set[str] = set()
    for file in files:
        part = _safetensors_entries(file)
        duplicate = seen & {entry.name for entry in part}
        if duplicate:
            raise CheckpointError(f"Tensor {sorted(duplicate)[0]!r} appears in more than one shard of {str(path)!r}.")
        seen.update(entry.name for entry in part)
        entries += part
    return entries


def load_mapped(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (file or shard directory), mapped from disk; a GGUF file's dequantized (by
    transformers, into float32: its blocks cannot be served as they are)."""
    layout = safetensors_layout(path)
    if layout is not None:
        return _tensors_of(layout)
    if meant_as_gguf(Path(path)):
        from ._gguf import gguf_state_dict

        return gguf_state_dict(Path(path))
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        part = _load_torch(file)
        duplicate = tensors.keys() & part.keys()
        if duplicate:
            raise CheckpointError(f"Tensor {sorted(duplicate)[0]!r} appears in more than one shard of {str(path)!r}.")
        tensors.update(part)
    return tensors


def _safetensors_entries(file: Path) -> list[SafetensorsEntry]:
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, struct.error, ValueError) as exc:  # JSON and Unicode errors are ValueErrors
        raise CheckpointError(f"Cannot read safetensors header of {str(file)!r}: {exc}. Is the file complete?") from exc
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        try:
            entries.append(_entry(file, name, info, data_start, size))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"Tensor {name!r} in {str(file)!r}: {exc}") from exc
    return entries


def _entry(file: Path, name: str, info: dict, data_start: int, size: int) -> SafetensorsEntry:
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported dtype {info['dtype']}")
    shape = tuple(int(n) for n in info["shape"])
    first, last = (int(o) for o in info["data_offsets"])
    if not 0 <= first <= last:
        raise ValueError(f"its data_offsets {[first, last]} are not a range of the data")
    begin, end = data_start + first, data_start + last
    if end > size:
        raise ValueError("its bytes run past the end of the file: the file is truncated")
    needed = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != needed or any(n < 0 for n in shape):
        raise ValueError(
            f"shape {list(shape)} of {info['dtype']} needs {needed} bytes, but its range holds {end - begin}"
        )
    return SafetensorsEntry(name, dtype, shape, file, begin, end)


def _tensors_of(layout: list[SafetensorsEntry]) -> dict[str, torch.Tensor]:
    import torch

    from ._dtypes import DTYPES

    raw = {file: map_file(file) for file in dict.fromkeys(entry.file for entry in layout)}
    tensors = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for entry in layout:
            data = raw[entry.file][entry.begin : entry.end]
            raw_bytes = torch.from_numpy(data) if entry.end > entry.begin else torch.empty(0, dtype=torch.uint8)
            tensors[entry.name] = raw_bytes.view(DTYPES[entry.dtype]).reshape(entry.shape)
    return tensors


def _load_torch(file: Path) -> dict[str, torch.Tensor]:
    import torch

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
