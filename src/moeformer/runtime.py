"""Process-level settings that change speed, not results. Opt-in: nothing here runs at import.

CPU training allocates and frees tensors of tens of MB at every step (an MoE layer's gathered
tokens: tokens * top_k * d_model floats). glibc's malloc serves blocks above its mmap threshold
(at most 32 MiB) with fresh ``mmap`` pages and trims freed memory back to the OS, so each step
pays page faults and page zeroing again. Raising the mmap and trim thresholds keeps freed memory
in the process for reuse. Measured on the MoE benchmark (BENCHMARKS.md): MoE fwd+bwd went from
about 1.8x to 1.4x the dense floor. jemalloc or tcmalloc through LD_PRELOAD do the same job.

Where moeformer decides for its user, it applies the setting: every ``moeformer`` command, the
demo, and the MoE-layer and training benchmarks (``--glibc-malloc`` opts out there). A program that imports the layers
alone keeps its own allocator settings unless it calls :func:`keep_freed_memory`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; True if applied (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    limit = 2**31 - 1
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
