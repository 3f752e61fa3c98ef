"""Giving freed memory back to the operating system after a large load.

NumPy allocates arrays below glibc's (dynamic, up to 32 MiB) mmap threshold from the heap; once freed, that memory
stays with the process until ``malloc_trim`` returns it. A load frees several transient copies of every point
(sorted copies, object-store reads), so without a trim a process keeps tens of bytes per loaded point it no longer
uses. :func:`release_free_memory` is a no-op where glibc is absent (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

__all__ = ["release_free_memory"]


@lru_cache(maxsize=None)
def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        return lib
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return free heap memory to the operating system (glibc ``malloc_trim(0)``); whether it could."""
    lib = _libc()
    if lib is None:
        return False
    try:
        lib.malloc_trim(0)
    except Exception:  # noqa: BLE001 - best effort
        return False
    return True
