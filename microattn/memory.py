"""Freed memory kept for reuse: glibc's malloc thresholds, set when microattn is imported.

A training step allocates a few hundred arrays of 0.25-8 MB (activations, gradients, the
products' outputs) and frees them by the end of the step. glibc's malloc serves blocks
from ``mmap`` above a threshold that it raises as such blocks are freed, and gives the top
of its heap back to the operating system once more than a trim threshold is free there.
With NumPy's pattern of short-lived large arrays that keeps the memory going back and
forth: every new array is fresh pages, and touching a fresh page is a page fault (about
1.3 us each on these VMs). Measured on the issue's GPT-style model (E = 256, 4 layers,
batch 8 x 256 tokens, one training step on the 2-core VM): 28,400 minor page faults per
step (111 MB of fresh pages), 305 ms a step; with the thresholds below, 2 faults and
267 ms. PyTorch keeps freed CPU memory in the process too.

So ``import microattn`` sets, process-wide:

* ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's largest dynamic value): smaller blocks come from
  the heap, where a freed block is reused by the next allocation of its size;
* ``M_TRIM_THRESHOLD`` = 512 MiB: up to that much free memory stays at the heap's top.

The cost is resident memory: a process keeps up to its high-water mark of such blocks
(plus 512 MiB of free heap at most) instead of returning it. *Unless the user chose*: if
``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (glibc's own variables) is in the
environment, nothing is changed, and with another C library (macOS, musl) neither.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set the two thresholds (see the module docstring); True if they were set."""
    if any(name in os.environ for name in USER_VARIABLES) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


KEPT = keep_freed_memory()  # once, at import
