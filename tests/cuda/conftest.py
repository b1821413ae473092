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
from pathlib import Path

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
