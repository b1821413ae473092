"""What only rung 1 of the numba.cuda ladder (``kernels/cuda/flash.py``, one row per thread)
has: its tile shapes, its argument count, its benchmark script. The grid, NaN, determinism,
device arrays and stats run on both rungs in test_rungs.py.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest

from microattn.kernels.cuda import flash

pytestmark = [
    pytest.mark.cuda,
    # masking.mix32 multiplies int64 scalars that wrap by design; the simulator runs it on
    # NumPy scalars, which warn about the (intended) wrap-around.
    pytest.mark.filterwarnings("ignore:overflow encountered in scalar multiply:RuntimeWarning"),
]

from tests.cuda.test_rungs import assert_matches_reference, mixed_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [np.float64, np.float32]


@pytest.mark.parametrize("tiles", [flash.Tiles(resident=4, staged=16),
                                   flash.Tiles(resident=16, staged=4)], ids=str)
def test_other_tile_shapes(tiles, monkeypatch):
    """Resident and staged tiles of different sizes: loops and band skipping stay exact."""
    monkeypatch.setattr(flash, "TILES_OVERRIDE", tiles)
    q, k, v, dout, spec = mixed_inputs()
    assert_matches_reference(flash, q, k, v, dout, spec)


def test_no_kernel_takes_more_than_fourteen_arguments():
    """The spec arrives as its five records (bias, band, dropout, reals, alibi) and the block
    mask of a mask_mod, never as loose scalars: dK/dV's 8 arrays and the 6 records are the
    most any kernel takes."""
    functions = flash.kernel_functions("float32", 8, 8, flash.SIM_TILES, True, True,
                                       has_softcap=True, has_alibi=True)
    counts = {name: len(inspect.signature(fn).parameters) for name, fn in functions.items()}
    assert max(counts.values()) <= 14, counts


def test_simulator_or_gpu_is_available():
    assert flash.unavailable_reason() is None


def test_benchmark_script_runs_a_tiny_size():
    """benchmarks/gpu_flash.py parses its arguments and times one tiny size (not dead code)."""
    path = ROOT / "benchmarks" / "gpu_flash.py"
    module_spec = importlib.util.spec_from_file_location("gpu_flash", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    rows = bench.main(["--n", "16", "--d", "8", "--heads", "1", "--batch", "1",
                       "--dtype", "float32", "--repeats", "1",
                       "--resident", "8", "--staged", "4"])
    assert len(rows) == 2  # non-causal and causal
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert all(r["max_rel_err"] < 1e-5 for r in rows)
    assert flash.TILES_OVERRIDE is None  # the benchmark puts the default tiles back
