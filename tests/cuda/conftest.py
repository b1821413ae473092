"""tests/cuda runs the numba.cuda kernels: on a GPU, or under numba's CUDA simulator.

CI runs this directory in its own process, because the simulator must be switched on
before numba is first imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda

In any other process (the main ``pytest`` run) with no GPU, this directory is deselected and
the session header says why. The PTX checks, which need no GPU and no simulator, live
in tests/kernels/test_cuda_ptx.py and run in the main process.
"""

from __future__ import annotations

import sys
import threading
import traceback
from pathlib import Path

import numpy as np

import pytest

from microattn.kernels.cuda import flash

HERE = Path(__file__).resolve().parent
UNAVAILABLE = flash.unavailable_reason()


REASON = ("tests/cuda needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1 set before numba is imported "
          f"(CI runs: NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda): {UNAVAILABLE}")


def pytest_report_header(config):
    if UNAVAILABLE is not None:
        return f"deselecting tests/cuda: {REASON}"
    return f"tests/cuda: running on {'the CUDA simulator' if flash.simulated() else 'a GPU'}"


def pytest_collection_modifyitems(config, items):
    """Without a GPU or the simulator, deselect this directory (one header line says why)."""
    if UNAVAILABLE is None:
        return
    here = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if here:
        config.hook.pytest_deselected(items=here)
        items[:] = [item for item in items if item not in here]


@pytest.fixture(autouse=True, scope="session")
def _fast_simulator_barriers():
    """Under the simulator, switch threads every 0.1 ms instead of every 5 ms.

    The simulator runs each GPU thread as a Python thread and polls them for
    ``syncthreads``; with Python's default 5 ms switch interval most of the time goes to
    waiting for the next switch (measured here: about 5x slower).
    """
    if not flash.simulated():
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(previous)


def _lock_simulator_shared_allocation():
    """Work around a race in numba-cuda's simulator, which the fast switching above exposes.

    ``FakeCUDAShared.array`` finds a block's shared array by the caller's source line with
    an unlocked check-then-insert: two simulated threads that both find no entry each make
    their own ``np.empty`` array, and one of them then reads the other's uninitialised
    memory as if it were the block's tile (seen once in CI: dk of 1e19 on one case). The
    replacement below is the simulator's own logic with the insert under a lock.
    """
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support
    from numba.core import types

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or refused as before
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # (file, line) of the kernel
        with lock:
            allocated = self._allocations.get(caller)
            if allocated is None:
                allocated = self._allocations[caller] = np.empty(shape, dtype)
        return allocated

    kernelapi.FakeCUDAShared.array = array


if UNAVAILABLE is None and flash.simulated():
    _lock_simulator_shared_allocation()
