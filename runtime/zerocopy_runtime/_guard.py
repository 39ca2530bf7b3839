"""Map attached weight pages read-only in this process.

Ray maps its object store writable in every worker, so one in-place op on a
shared weight (an optimizer step, `copy_`, a BatchNorm in train mode) would
silently change the weights of every replica on the node. `mprotect` turns
such a write into an immediate SIGSEGV in the offending process only; other
processes keep their own (writable) mapping of the same, intact pages.
"""

from __future__ import annotations

import ctypes
import faulthandler
import mmap
import os
import threading

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def inner_pages(start: int, end: int) -> tuple[int, int]:
    """The page-aligned range fully inside [start, end): safe to protect without touching neighbours."""
    first = -(-start // PAGE) * PAGE
    last = end // PAGE * PAGE
    return first, max(first, last)


def set_read_only(start: int, end: int, read_only: bool) -> None:
    """Change the protection of [start, end); also turns on faulthandler, so that a
    guarded write's SIGSEGV prints the Python line that wrote."""
    if end <= start:
        return
    prot = mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE
    if _libc.mprotect(start, end - start, prot) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mprotect failed on the shared weights: {os.strerror(err)}")
    if read_only and not faulthandler.is_enabled():
        faulthandler.enable()


_holders: dict[tuple[int, int], int] = {}
# Finalizers may run on any thread, and mprotect releases the GIL: count under a lock.
_lock = threading.Lock()


def acquire(start: int, end: int) -> None:
    """Count one more holder of a page range; the first one protects it."""
    with _lock:
        count = _holders.get((start, end), 0)
        if count == 0:
            set_read_only(start, end, True)
        _holders[(start, end)] = count + 1


def release(start: int, end: int) -> None:
    """Count one holder less; the last one makes the pages writable again."""
    with _lock:
        count = _holders.pop((start, end), 0) - 1
        if count > 0:
            _holders[(start, end)] = count
        elif count == 0:
            set_read_only(start, end, False)
