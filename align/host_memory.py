"""The process's host memory: glibc's malloc asked to keep what a training step frees for the next."""

from __future__ import annotations

import functools
import logging
import sys

log = logging.getLogger("align")

# mallopt(3) parameters (glibc's malloc.h) and the largest mmap threshold glibc accepts on 64-bit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20
KEPT_FREE_BYTES = 256 * 2**20


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a micro-batch frees for the next one, instead of handing
    it back to the kernel and faulting it in again. True when the setting took (Linux with glibc).

    Each micro-batch's backward frees the activations its forward allocated, and the next forward
    allocates them again. By default glibc serves a block above its mmap threshold (128 KiB, raised
    to the largest block freed so far) with fresh pages, and returns the top of its heap to the
    kernel once more than twice that is free there; every micro-batch then page-faults its
    activations back in. On the demo model that was ~60,000 faults per iteration, ~10% of the
    optimisation phase's CPU time on a 2-core VM. With the threshold at glibc's maximum (32 MiB)
    and up to 256 MiB of free heap kept, an iteration faults a handful of pages. Process-wide, and
    once: everything after the first optimisation phase (rollouts included) reuses memory the same
    way. Elsewhere (macOS, musl) nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES))
    log.debug("malloc keeps freed memory: %s", kept)
    return kept
