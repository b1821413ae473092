"""numba.cuda rung 2 (register micro-tiles, ``kernels/cuda/tiled.py``) on the shared case grid.

Runs under the simulator (``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda``) or a GPU.
Under the simulator the tiles are ``tiled.SIM_TILING`` (8 x 8 tiles, 2 x 2 threads, head-dim
chunks of 4), so lengths 1, 7 and 37 cross several tiles and leave ragged edges, head dims of
3, 5, 8 and 16 are padded within a chunk or span two, and the warp shuffles (simulated) reduce
across two lanes; ``test_other_tilings`` varies all of that. Every masking regime of
tests/grid.py (masks, windows, empty rows, dropout, large logits, huge finite masks), GQA/MQA
and Dv != D, in float64 and float32, judged by the one yardstick (``check_against_reference``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from microattn.kernels import reference
from microattn.kernels.cuda import tiled
from microattn.kernels.spec import make_attention_spec
from tests.grid import (
    NAMES, NAN_CASES, NAN_SOURCES, Case, check_against_reference, check_nan_propagation, grid,
    make_inputs, nan_dependents, nan_inputs, run_kernel,
)

pytestmark = [
    pytest.mark.cuda,
    # masking.mix32 multiplies int64 scalars that wrap by design; the simulator runs it on
    # NumPy scalars, which warn about the (intended) wrap-around.
    pytest.mark.filterwarnings("ignore:overflow encountered in scalar multiply:RuntimeWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [np.float64, np.float32]


def simulator_case(case: Case) -> Case:
    """Batch 1 except where the masking needs two batch entries (key padding of batch 1)."""
    return case if case.masking == "padding_mask" else dataclasses.replace(case, B=1)


CASES = [simulator_case(c) for c in grid(sizes=(1, 7, 37), unequal=((7, 37), (37, 7)))]


def spec_for(q, k, v, kwargs):
    return make_attention_spec(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, dtype):
    check_against_reference(tiled, case, dtype)


def mixed_inputs(dtype=np.float64):
    """q, k, v, dout, spec: GQA, Dv != D, a float mask with -inf, a window and dropout at once."""
    case = Case(37, 29, Hq=4, Hkv=2, D=8, Dv=5, B=1, masking="float_mask")
    q, k, v, dout, kwargs = make_inputs(case, dtype, seed=3)
    kwargs.update(window=(9, 4), dropout_p=0.25, seed=99)
    return q, k, v, dout, spec_for(q, k, v, kwargs)


def assert_matches(got, want, rtol):
    for name in NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * 1e-3, err_msg=name)


def test_everything_at_once_matches_reference():
    q, k, v, dout, spec = mixed_inputs()
    assert_matches(run_kernel(tiled, q, k, v, dout, spec), run_kernel(reference, q, k, v, dout, spec), 1e-9)


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
    assert_matches(run_kernel(tiled, q, k, v, dout, spec), run_kernel(reference, q, k, v, dout, spec), 1e-9)


@pytest.mark.parametrize("D, Dv", [(64, 128), (128, 32)])
def test_large_head_dims(D, Dv):
    """Head dims the GPU tiles are sized for: many chunks, several fragments of a thread's row."""
    case = Case(9, 11, Hq=2, Hkv=1, D=D, Dv=Dv, B=1, masking="causal")
    check_against_reference(tiled, case, np.float64)


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
    assert_matches(got, want, 1e-9 if dtype == np.float64 else 2e-5)
    assert np.abs(got["out"][0, 0, 2]).max() <= np.abs(v).max()  # a convex combination of v


@pytest.mark.parametrize("source", NAN_SOURCES)
@pytest.mark.parametrize("case", [NAN_CASES[1], NAN_CASES[3], NAN_CASES[4]], ids=lambda c: c.id)
def test_nan_inputs_give_nan_outputs(case, source):
    """As for every backend: every output that depends on a NaN input is NaN."""
    q, k, v, dout, kwargs, row = nan_inputs(case, np.float32, source)
    spec = spec_for(q, k, v, kwargs)
    got = run_kernel(tiled, q, k, v, dout, spec)
    clean = run_kernel(tiled, *(np.nan_to_num(x, nan=0.0) for x in (q, k, v)), dout, spec)
    allowed = np.broadcast_to(reference.allowed_pairs(spec), (spec.B, spec.Hq, spec.Nq, spec.Nk))
    must = nan_dependents(allowed, spec.Hq // spec.Hkv, source, row)
    check_nan_propagation(got, clean, must, 1e-4, source, row)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_deterministic(dtype):
    """No atomics, shuffles in a fixed order: two runs give the same bits."""
    q, k, v, dout, spec = mixed_inputs(dtype)
    first = run_kernel(tiled, q, k, v, dout, spec)
    second = run_kernel(tiled, q, k, v, dout, spec)
    for name in NAMES:
        assert np.array_equal(first[name], second[name], equal_nan=True), name


def test_device_arrays_stay_on_the_device():
    q, k, v, dout, spec = mixed_inputs()
    host = run_kernel(tiled, q, k, v, dout, spec)
    q_d, k_d, v_d, dout_d = (tiled.to_device(x) for x in (q, k, v, dout))
    out_d, stats_d = tiled.forward(q_d, k_d, v_d, spec)
    assert tiled.is_device_array(out_d) and tiled.is_device_array(stats_d)
    grads_d = tiled.backward(q_d, k_d, v_d, out_d, stats_d, dout_d, spec)
    assert all(tiled.is_device_array(g) for g in grads_d)
    for name, x in zip(("out", "dq", "dk", "dv"), (out_d,) + tuple(grads_d)):
        assert np.array_equal(tiled.to_host(x), host[name]), name


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
