"""tests/cuda runs the numba.cuda kernels: on a GPU, or under numba's CUDA simulator.

CI runs this directory in its own process, because the simulator must be switched on
before numba is first imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda

In any other process (the main ``pytest`` run) with no GPU, every test here is skipped with
one reason naming what is missing. The PTX checks, which need no GPU and no simulator, live
in tests/kernels/test_cuda_ptx.py and run in the main process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from microattn.kernels.cuda import flash

HERE = Path(__file__).resolve().parent
UNAVAILABLE = flash.unavailable_reason()


def pytest_collection_modifyitems(config, items):
    if UNAVAILABLE is None:
        return
    skip = pytest.mark.skip(
        reason="tests/cuda needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1 set before numba is "
               f"imported (CI: NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda): {UNAVAILABLE}")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


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
