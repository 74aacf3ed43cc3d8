"""Freed host memory kept for reuse, so that a CPU engine's large tensors stop page-faulting.

glibc's malloc serves every block above its mmap threshold (128 KiB at first, raised to at most
32 MiB as blocks are freed) with a fresh ``mmap`` and returns it to the kernel on ``free``, and
trims the heap's top above 128 KiB. A CPU engine's pass allocates and frees tensors of 1-18 MiB
(activations, FFT tiles, convolution outputs) dozens of times, so each pass faulted in ~220 MB
of zeroed pages again: 42,000-56,000 minor faults per 64-row pass of APOGEENet III on a 2-core
Xeon, ~15% of its time (BENCHMARKS.md). With a fixed 32 MiB mmap threshold and a 1 GiB trim
threshold the heap keeps those pages and the same pass faults a few times at most. The numbers
are unchanged (only where memory comes from changes); the process's resident memory stays near
its peak instead of shrinking between passes, which a pod's memory limit must cover anyway.

A ``MALLOC_*`` environment variable or ``GLIBC_TUNABLES`` set by the operator wins: nothing is
changed then. Other C libraries (musl) are left as they are.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""glibc's largest mmap threshold on 64-bit machines; blocks above it are mmapped in any case."""
TRIM_THRESHOLD = 1 << 30

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Sets glibc's thresholds once per process; True if this process's malloc keeps freed
    memory (now or from an earlier call), False if the operator's settings or the C library
    are left in charge."""
    global _kept
    if _kept is None:
        _kept = _set_thresholds()
    return _kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has changed this process's thresholds (benchmarks say
    which processes ran that way)."""
    return bool(_kept)


def _set_thresholds() -> bool:
    overridden = sorted(name for name in os.environ if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES")
    if overridden:
        log.info("malloc thresholds left to the environment (%s)", ", ".join(overridden))
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        log.info("malloc thresholds unchanged: this C library has no mallopt")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        log.info("mallopt refused the thresholds: freed memory is returned to the kernel as before")
        return False
    log.info("malloc keeps freed memory for reuse (mmap threshold %d MiB, trim threshold %d MiB): "
             "large tensors no longer page-fault on every pass", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    return True
