"""What only rung 2 of the numba.cuda ladder (register micro-tiles, ``kernels/cuda/tiled.py``)
has: other tilings, the shared-memory budget, its benchmark script. The grid, NaN,
determinism, device arrays and stats run on both rungs in test_rungs.py.

Under the simulator the tiles are ``tiled.SIM_TILING`` (8 x 8 tiles, 2 x 2 threads, head-dim
chunks of 4), so lengths 1, 7 and 37 cross several tiles and leave ragged edges, head dims of
3, 5, 8 and 16 are padded within a chunk or span two, and the warp shuffles (simulated) reduce
across two lanes; ``test_other_tilings`` varies all of that.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from microattn.kernels import reference
from microattn.kernels.cuda import tiled
from tests.grid import (
    NAMES, run_kernel,
)

pytestmark = [
    pytest.mark.cuda,
    # masking.mix32 multiplies int64 scalars that wrap by design; the simulator runs it on
    # NumPy scalars, which warn about the (intended) wrap-around.
    pytest.mark.filterwarnings("ignore:overflow encountered in scalar multiply:RuntimeWarning"),
]

from tests.cuda.test_rungs import assert_matches_reference, mixed_inputs, spec_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [np.float64, np.float32]


if tiled.simulated():  # a handful of threads per block
    TILINGS = {
        "4 lanes a row": tiled.Tiling(rows=8, cols=16, threads_rows=2, threads_cols=4, chunk=8),
        "8-row thread tiles": tiled.Tiling(rows=16, cols=8, threads_rows=2, threads_cols=2, chunk=4),
        "8-col thread tiles, 1 lane": tiled.Tiling(rows=8, cols=8, threads_rows=2, threads_cols=1, chunk=8),
        "dkdv apart": tiled.Tilings(main=tiled.Tiling(8, 8, 2, 2, 4), dkdv=tiled.Tiling(4, 16, 1, 4, 4)),
    }
else:  # whole warps, float64 within the 48 KiB of static shared memory
    TILINGS = {
        "32 lanes a row": tiled.Tiling(rows=16, cols=128, threads_rows=4, threads_cols=32, chunk=8),
        "8-row thread tiles": tiled.Tiling(rows=64, cols=32, threads_rows=8, threads_cols=8, chunk=8),
        "dkdv apart": tiled.Tilings(main=tiled.Tiling(16, 64, 4, 16, 8), dkdv=tiled.Tiling(16, 128, 4, 32, 8)),
    }


@pytest.mark.parametrize("tiling", list(TILINGS.values()), ids=list(TILINGS))
def test_other_tilings(tiling, monkeypatch):
    """More lanes per row (shuffles over 4 lanes), thread tiles of two fragments, one lane a row
    (no shuffle at all), dK/dV on tiles of its own: the same results."""
    monkeypatch.setattr(tiled, "TILING_OVERRIDE", tiling)
    q, k, v, dout, spec = mixed_inputs()
    assert_matches_reference(tiled, q, k, v, dout, spec)


HUGE = {"-1e9": -1e9, "finfo.min": None, "-1e30": -1e30}


@pytest.mark.parametrize("big", list(HUGE), ids=list(HUGE))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_padding_rows(dtype, big):
    """Issue 11's problem: rows masked by a huge finite value, wholly (row 2) and partly
    (row 4), against the reference (the same rule, p = exp(s - m) / l) in the same dtype; a
    wholly masked row gives the softmax of its scores (float64) or the average of v (float32,
    where s - 1e9 rounds to one value), never p = 1 for every key."""
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal(shape).astype(dtype)
                     for shape in ((1, 1, 6, 4), (1, 1, 6, 4), (1, 1, 6, 4), (1, 1, 6, 4)))
    mask = rng.standard_normal((6, 6)).astype(dtype)
    value = np.finfo(dtype).min if HUGE[big] is None else HUGE[big]
    mask[2, :] = value
    mask[4, :3] = value
    spec = spec_for(q, k, v, {"attn_mask": mask})
    got = run_kernel(tiled, q, k, v, dout, spec)
    want = run_kernel(reference, q, k, v, dout, spec)
    rtol = 1e-9 if dtype == np.float64 else 2e-5
    for name in NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * 1e-3, err_msg=name)
    assert np.abs(got["out"][0, 0, 2]).max() <= np.abs(v).max()  # a convex combination of v


def test_tiles_fit_the_shared_memory_budget():
    """The GPU tiles at the head dims they are sized for (the PTX test checks the declarations)."""
    for dtype in ("float32", "float64"):
        for D, Dv in ((64, 64), (128, 128), (128, 32), (8, 8)):
            used = tiled.shared_memory_bytes(dtype, D, Dv, tiled.gpu_tilings(dtype, D, Dv))
            assert max(used.values()) <= tiled.SHARED_MEMORY_BUDGET, (dtype, D, Dv, used)
    for tiling in TILINGS.values():  # test_other_tilings runs float64 at D = 8, Dv = 5
        assert max(tiled.shared_memory_bytes("float64", 8, 5, tiling).values()) <= tiled.SHARED_MEMORY_BUDGET


def test_tiles_over_the_shared_memory_budget_are_refused(monkeypatch):
    monkeypatch.setattr(tiled, "TILING_OVERRIDE", tiled.Tiling(128, 64, 16, 16, 16))
    q, k, v, dout, spec = mixed_inputs(np.float64)
    with pytest.raises(ValueError, match="shared memory"):
        tiled.forward(q, k, v, spec)


def test_inputs_off_a_16_byte_boundary_are_copied():
    """The staging reads rows with 16-byte loads: a device array at an odd offset (8 bytes
    into a float64 buffer) is copied to a fresh, aligned one; an aligned one passes as is."""
    buffer = tiled.to_device(np.zeros(32, dtype=np.float64))
    start = (-tiled.device_address(buffer) % 16) // 8  # the first value on a 16-byte boundary
    base = buffer[start:start + 17]
    base[:] = np.arange(17.0)
    assert tiled.aligned(base) is base
    offset = base[1:]  # 8 bytes on
    copied = tiled.aligned(offset)
    assert copied is not offset
    np.testing.assert_array_equal(tiled.to_host(copied), np.arange(1.0, 17.0))
    assert tiled.aligned(copied) is copied


def test_protocol():
    from microattn.kernels import protocol

    protocol.check(tiled, protocol.AttentionKernel)
    assert tiled.unavailable_reason() is None


def test_benchmark_script_runs_a_tiny_size():
    """benchmarks/gpu_tiled.py parses its arguments and times one tiny size (not dead code)."""
    path = ROOT / "benchmarks" / "gpu_tiled.py"
    module_spec = importlib.util.spec_from_file_location("gpu_tiled", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    tiling = ["--tiling", "8,8,2,2,4"] if tiled.simulated() else []
    rows = bench.main(["--n", "16", "--d", "8", "--heads", "1", "--batch", "1", "--dtype", "float32",
                       "--repeats", "1", "--no-torch", "--validate-n", "16"] + tiling)
    assert len(rows) == 2  # non-causal and causal
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert all(r["max_err"] < 1e-5 for r in rows)
    assert tiled.TILING_OVERRIDE is None  # the benchmark puts the default tiles back
