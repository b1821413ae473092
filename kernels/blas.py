"""One OpenBLAS thread pin for the whole package: ``with single_threaded(): ...``.

A pip-installed process holds two copies of OpenBLAS, each with its own thread pool:

* NumPy's (in ``numpy.libs``, the 64-bit-integer build: its symbols end in ``64_``),
  which ``a @ b`` on NumPy arrays calls, e.g. every matrix product of the autograd engine;
* SciPy's (in ``scipy.libs``), which numba's ``np.dot`` calls inside jitted kernels.

Pinning one and not the other leaves half the products free to spawn threads. Two
places want both pinned to one thread while they run:

* the demo's training loop: its products are tiny (about 768 x 64 @ 64 x 256) and one
  training step measured 3x slower with OpenBLAS's default threads than with one, on a
  busy 2-core machine;
* the parallel CPU kernels: inside a ``prange`` every worker already owns a core, and an
  OpenBLAS that spawns threads for each tile product oversubscribes the machine
  (measured: 22 GF/s -> 1.2 GF/s on 128 x 128 x 64 tiles, 2 cores).

The setting is process-wide while it lasts: a BLAS call made concurrently from another
Python thread runs single-threaded too (correct, just slower). Nested pins are free: an
inner ``single_threaded()`` finds one thread already and changes nothing. Where a
library is not found (another platform, a build linked to a system BLAS) its pin is a
no-op.

This module imports nothing from microattn: the kernels may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import importlib.util
import os

# (package, the folder next to it holding its bundled libraries, the symbols' suffix)
_OPENBLAS_COPIES = (("numpy", "numpy.libs", "64_"), ("scipy", "scipy.libs", ""))


def _find_openblas(package: str, libs_folder: str, suffix: str):
    """(get, set) for the thread count of ``package``'s bundled OpenBLAS, or None.

    The package is located without importing it (``find_spec``); loading the library
    by its path shares the copy the package itself loads, so the pin reaches it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(list(spec.submodule_search_locations)[0])
    for path in sorted(glob.glob(os.path.join(site, libs_folder, "libscipy_openblas*.so*"))):
        try:
            lib = ctypes.CDLL(path)
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}")
            put = getattr(lib, f"scipy_openblas_set_num_threads{suffix}")
        except (OSError, AttributeError):
            continue
        get.restype, get.argtypes = ctypes.c_int, []
        put.restype, put.argtypes = None, [ctypes.c_int]
        return get, put
    return None


@functools.cache
def thread_controls() -> tuple:
    """The (get, set) pairs of every OpenBLAS copy found, looked up once per process."""
    found = (_find_openblas(*copy) for copy in _OPENBLAS_COPIES)
    return tuple(controls for controls in found if controls is not None)


@contextlib.contextmanager
def single_threaded():
    """Run every OpenBLAS copy found (NumPy's and SciPy's) on one thread inside the block,
    and put back each one's thread count afterwards."""
    restore = []
    try:
        for get, put in thread_controls():
            before = get()
            if before != 1:
                put(1)
                restore.append((put, before))
        yield
    finally:
        for put, before in reversed(restore):
            put(before)
