"""model.dtype's cast, done as bytes without torch by the owner: equal to torch's `.to()`, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zerocopy_runtime._cast import cast_bytes, cast_size
from zerocopy_runtime._dtypes import DTYPES

pytestmark = pytest.mark.unit

_RNG = np.random.default_rng(0)
#: Random bit patterns, and the edges: zeros, infinities, NaNs, the largest and smallest subnormals, the ties that
#: round to even (0x3F808000 down, 0x3F818000 up) and values beyond float16's range.
_EDGES32 = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 1, 0x007FFFFF, 0x3F808000,
            0x3F818000, 0x3F817FFF, 0x477FF000, 0x47800000]  # fmt: skip
SOURCES = {
    "float32": np.concatenate(
        [_RNG.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32), np.array(_EDGES32, dtype=np.uint32)]
    ).view(np.uint8),
    "bfloat16": np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.uint8),  # every value
    "float16": np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.uint8),
    "float64": np.concatenate([_RNG.standard_normal(10_000) * 1e3, [np.inf, -np.inf, 1e-310, 1e300]]).view(np.uint8),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("target", ["float32", "bfloat16", "float16"])
def test_the_cast_equals_torchs_bit_for_bit(source: str, target: str) -> None:
    raw = SOURCES[source]
    ours = torch.from_numpy(cast_bytes(raw, source, target).copy()).view(DTYPES[target])
    theirs = torch.from_numpy(raw.copy()).view(DTYPES[source]).to(DTYPES[target])
    assert len(cast_bytes(raw, source, target)) == cast_size(len(raw), source, target)
    nan = theirs.isnan()
    assert torch.equal(ours.isnan(), nan)  # a NaN stays a NaN (its payload bits are not kept)
    integer = {"float32": torch.int32, "bfloat16": torch.int16, "float16": torch.int16}[target]
    assert torch.equal(ours[~nan].view(integer), theirs[~nan].view(integer))


def test_the_same_dtype_is_the_same_bytes() -> None:
    raw = SOURCES["float32"]
    assert cast_bytes(raw, "float32", "float32") is raw
