"""Kubernetes quantities ("16Gi", "500m", 4) as numbers, for the sums that size pods."""

from __future__ import annotations

from decimal import Decimal

_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip


def parse(quantity: int | str) -> Decimal:
    """The value of a quantity: bytes for memory, cores for CPU ("500m" is 0.5)."""
    text = str(quantity).strip()
    if text.endswith("m"):
        return Decimal(text[:-1]) / 1000
    for suffix, factor in _SUFFIXES.items():
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * factor
    return Decimal(text)


def to_bytes(quantity: int | str) -> int:
    return int(parse(quantity))


def memory(nbytes: int) -> str:
    """Bytes as the largest binary unit that divides them exactly ("20Gi", "1536Mi")."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        factor = _SUFFIXES[suffix]
        if nbytes and nbytes % factor == 0:
            return f"{nbytes // factor}{suffix}"
    return str(nbytes)


def human(nbytes: int) -> str:
    """Bytes for people: exact where a unit divides them ("4Gi"), else to a tenth ("3.2Mi")."""
    exact = memory(nbytes)
    if exact[-2:] in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki") or nbytes < 2**10:
        return exact
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        if nbytes >= _SUFFIXES[suffix]:
            return f"{nbytes / _SUFFIXES[suffix]:.1f}{suffix}"
    return exact
