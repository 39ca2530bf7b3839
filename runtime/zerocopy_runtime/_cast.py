"""Casting published weights between floating dtypes as bytes, without torch, bit for bit as torch's `.to()` does
(a NaN stays a NaN; its payload bits are not kept).

`model.dtype` casts a checkpoint once, when its owner publishes it (a bfloat16 checkpoint served in float32 on
CPUs, a float32 one in bfloat16 on GPUs), so that no replica holds a private cast copy. The owner of a
safetensors checkpoint never imports torch (see `_owner`), so the cast is done here with numpy: float32 and
float16 natively (IEEE round to nearest even, as torch), bfloat16 as the upper half of a float32, rounded to
nearest even, a NaN made a quiet NaN. Only float64 to bfloat16 goes through torch, because
rounding float64 to float32 first would round twice.
"""

from __future__ import annotations

import numpy as np

from ._manifest import ITEMSIZE

__all__ = ["FLOATING", "cast_bytes", "cast_size"]

#: The dtypes a cast applies to: integer, boolean, complex and float8 tensors are served as they are stored.
FLOATING = frozenset({"float64", "float32", "float16", "bfloat16"})
_NUMPY = {"float64": np.float64, "float32": np.float32, "float16": np.float16}
#: A quiet bfloat16 NaN (rounding a NaN's bits could carry it into an infinity or a zero).
_BF16_NAN = np.uint16(0x7FC0)


def cast_size(nbytes: int, source: str, target: str) -> int:
    """Bytes of a storage of `nbytes` in `source` once cast to `target`."""
    return nbytes // ITEMSIZE[source] * ITEMSIZE[target]


def cast_bytes(raw: np.ndarray, source: str, target: str) -> np.ndarray:
    """The bytes `raw` (uint8, holding `source` values) as `target` values, in a new uint8 array."""
    if source == target:
        return raw
    if source == "float64" and target == "bfloat16":
        return _torch_cast(raw, source, target)
    values = _to_float32(raw, source) if source == "bfloat16" else raw.view(_NUMPY[source])
    if target == "bfloat16":
        out = _float32_to_bfloat16(values.astype(np.float32, copy=False))
    else:
        with np.errstate(over="ignore"):  # beyond float16's range is infinity, as in torch
            out = values.astype(_NUMPY[target], copy=False)
    return out.view(np.uint8)


def _to_float32(raw: np.ndarray, source: str) -> np.ndarray:
    """bfloat16 is the upper half of a float32: widening is exact."""
    assert source == "bfloat16"
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    bits = values.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)  # to nearest, ties to even
    out = ((bits + rounding) >> 16).astype(np.uint16)
    out[np.isnan(values)] = _BF16_NAN
    return out


def _torch_cast(raw: np.ndarray, source: str, target: str) -> np.ndarray:
    import torch

    from ._dtypes import DTYPES

    tensor = torch.from_numpy(raw.copy()).view(DTYPES[source]).to(DTYPES[target])
    return tensor.view(torch.uint8).numpy()
