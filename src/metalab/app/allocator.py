"""Keep freed CPU memory in the process for the next tensor (Linux with glibc).

glibc's malloc gives every large block (from 128 KiB, rising to 32 MiB as it adapts) its own
``mmap`` and unmaps it on free, so every new large tensor -- each activation of a vmapped meta-batch
is tens to hundreds of MB -- starts as fresh pages that the kernel faults in and zeroes on first
touch. On the 2-core benchmark machine that made a multiply over a 120 MB activation take 78 ms
instead of 13 ms, and the vmapped 5-way conv4 step with 15 queries per class take 2.31 s instead of
1.49 s on one thread (``scripts/benchmark.py --system-malloc`` against the default). Serving large
blocks from the heap and never trimming it lets freed blocks be reused, as CUDA's caching allocator
(and jemalloc or tcmalloc, which Intel's PyTorch CPU guide recommends) do; the cost is that the
process keeps its peak memory until it exits. ``metalab`` applies it when a run starts
(``metalab.app.cli.run``); set ``METALAB_SYSTEM_MALLOC=1`` to keep glibc's defaults."""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["M_MMAP_MAX", "M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD", "mallopt", "reuse_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)


def mallopt(parameter: int, value: int) -> bool:
    """glibc's ``mallopt(parameter, value)``: True when it took the setting, False where the C
    library has no mallopt (not Linux; musl and others)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        function = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):
        return False
    function.argtypes, function.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return function(parameter, value) == 1


def reuse_freed_memory() -> bool:
    """Tell glibc to serve large blocks from the heap and not to return freed memory to the
    system. True when it took both settings; False (nothing changed) where the C library is not
    glibc, or when ``METALAB_SYSTEM_MALLOC=1``."""
    if os.environ.get("METALAB_SYSTEM_MALLOC") == "1":
        return False
    return mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
