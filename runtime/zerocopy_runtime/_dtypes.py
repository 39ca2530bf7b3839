"""Torch dtypes by the names the manifest stores (`_manifest.ITEMSIZE`), for the processes that build tensors."""

from __future__ import annotations

import torch

from ._manifest import ITEMSIZE

__all__ = ["DTYPES", "dtype_name"]

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in ITEMSIZE}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
