"""numba.cuda flash attention against the NumPy reference, on the shared case grid.

Runs under the simulator (``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda``) or a GPU.
The simulator runs every GPU thread as a Python thread, so the grid is shrunk to lengths
1, 7, 37 (several 8-row tiles and ragged edges) and batch 1 where the masking allows; every
masking regime (masks, windows, empty rows, dropout, large logits), GQA/MQA and Dv != D stay.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from microattn.kernels import reference
from microattn.kernels.cuda import flash
from microattn.kernels.spec import make_attention_spec
from tests.grid import (
    NAN_CASES, NAN_SOURCES, Case, check_nan_propagation, grid, make_inputs, nan_dependents, nan_inputs, rel_err,
)

pytestmark = [
    pytest.mark.cuda,
    # masking.mix32 multiplies int64 scalars that wrap by design; the simulator runs it on
    # NumPy scalars, which warn about the (intended) wrap-around.
    pytest.mark.filterwarnings("ignore:overflow encountered in scalar multiply:RuntimeWarning"),
]

ROOT = Path(__file__).resolve().parents[2]


def simulator_case(case: Case) -> Case:
    """Batch 1 except where the masking needs two batch entries (key padding of batch 1)."""
    return case if case.masking == "padding_mask" else dataclasses.replace(case, B=1)


CASES = [simulator_case(c) for c in grid(sizes=(1, 7, 37), unequal=((7, 37), (37, 7)))]

# float32 against the float64 truth. With large logits (scores of order 1e3) a rounding of
# the score by float32's 6e-8 relative error moves exp(s - lse) by ~1e-4 relative: the
# problem is that ill-conditioned, whichever kernel computes it.
TOL = {np.float64: 1e-9, np.float32: 2e-5}
NAMES = ("out", "lse", "dq", "dk", "dv")
TOL_LARGE_LOGITS_F32 = 1e-3


def spec_for(q, k, v, kwargs):
    return make_attention_spec(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), **kwargs)


def run_flash(q, k, v, dout, spec):
    out, lse = flash.forward(q, k, v, spec)
    dq, dk, dv = flash.backward(q, k, v, out, lse, dout, spec)
    return out, lse, dq, dk, dv


def run_reference_f64(q, k, v, dout, kwargs):
    """The oracle in float64 on the same (possibly float32) inputs."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    spec = spec_for(q, k, v, kwargs)
    out, lse = reference.forward(q, k, v, spec)
    return (out, lse) + reference.backward(q, k, v, out, lse, dout, spec)


def err(actual, expected) -> float:
    """rel_err, but absolute when everything expected is below 1 in size.

    The inputs are O(1), so an expected array that is all tiny is rounding noise around an
    exact zero: e.g. dq and dk when each query sees a single key (the softmax of one score is
    constant, so ds = p * (dp - delta) = 0 up to rounding). Relative error means nothing there.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if np.abs(expected).max(initial=0.0) >= 1.0:
        return rel_err(actual, expected)
    return np.inf if np.isnan(actual).any() else float(np.abs(actual - expected).max(initial=0.0))


def assert_matches_reference(got, want, tol):
    out, lse, dq, dk, dv = got
    r_out, r_lse, r_dq, r_dk, r_dv = want
    empty = np.isneginf(r_lse)  # rows that may attend to no key
    assert np.array_equal(np.isneginf(lse), empty), "lse is -inf exactly on the empty rows"
    assert np.isfinite(lse[~empty]).all()
    for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not np.isnan(x).any(), f"{name} has NaN"
    assert (out[empty] == 0).all() and (dq[empty] == 0).all(), "empty rows: zeros, zero gradient"
    errors = {
        "out": err(out, r_out),
        "lse": err(lse[~empty], r_lse[~empty]),
        "dq": err(dq, r_dq),
        "dk": err(dk, r_dk),
        "dv": err(dv, r_dv),
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.2e} > {tol:.0e} ({errors})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float64_matches_reference(case):
    q, k, v, dout, kwargs = make_inputs(case, np.float64)
    got = run_flash(q, k, v, dout, spec_for(q, k, v, kwargs))
    assert_matches_reference(got, run_reference_f64(q, k, v, dout, kwargs), TOL[np.float64])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float32_matches_reference(case):
    q, k, v, dout, kwargs = make_inputs(case, np.float32)
    got = run_flash(q, k, v, dout, spec_for(q, k, v, kwargs))
    assert all(x.dtype == np.float32 for x in got)
    tol = TOL_LARGE_LOGITS_F32 if case.masking == "large_logits" else TOL[np.float32]
    assert_matches_reference(got, run_reference_f64(q, k, v, dout, kwargs), tol)


def mixed_case(dtype=np.float64):
    """GQA, Dv != D, a float mask with -inf, a window and dropout, all at once."""
    case = Case(37, 29, Hq=4, Hkv=2, D=8, Dv=5, B=1, masking="float_mask")
    q, k, v, dout, kwargs = make_inputs(case, dtype, seed=3)
    kwargs.update(window=(9, 4), dropout_p=0.25, seed=99)
    return q, k, v, dout, kwargs


def test_everything_at_once_matches_reference():
    q, k, v, dout, kwargs = mixed_case()
    got = run_flash(q, k, v, dout, spec_for(q, k, v, kwargs))
    assert_matches_reference(got, run_reference_f64(q, k, v, dout, kwargs), TOL[np.float64])


@pytest.mark.parametrize("source", NAN_SOURCES)
@pytest.mark.parametrize("case", [NAN_CASES[1], NAN_CASES[3], NAN_CASES[4]], ids=lambda c: c.id)
def test_nan_inputs_give_nan_outputs(case, source):
    """As tests/kernels/test_cpu_flash.py: every output that depends on a NaN input is NaN."""
    q, k, v, dout, kwargs, row = nan_inputs(case, np.float32, source)
    spec = spec_for(q, k, v, kwargs)
    got = run_flash(q, k, v, dout, spec)
    clean = run_flash(*(np.nan_to_num(x, nan=0.0) for x in (q, k, v)), dout, spec)
    allowed = np.broadcast_to(reference.allowed_pairs(spec), (spec.B, spec.Hq, spec.Nq, spec.Nk))
    must = nan_dependents(allowed, spec.Hq // spec.Hkv, source, row)
    check_nan_propagation(dict(zip(NAMES, got)), dict(zip(NAMES, clean)), must, 1e-4, source, row)


@pytest.mark.parametrize("tiles", [flash.Tiles(resident=4, staged=16),
                                   flash.Tiles(resident=16, staged=4)], ids=str)
def test_other_tile_shapes(tiles, monkeypatch):
    """Resident and staged tiles of different sizes: loops and band skipping stay exact."""
    monkeypatch.setattr(flash, "TILES_OVERRIDE", tiles)
    q, k, v, dout, kwargs = mixed_case()
    got = run_flash(q, k, v, dout, spec_for(q, k, v, kwargs))
    assert_matches_reference(got, run_reference_f64(q, k, v, dout, kwargs), TOL[np.float64])


@pytest.mark.parametrize("D, Dv", [(64, 128), (128, 32)])
def test_large_head_dims(D, Dv):
    case = Case(7, 9, Hq=2, Hkv=1, D=D, Dv=Dv, B=1, masking="causal")
    q, k, v, dout, kwargs = make_inputs(case, np.float64)
    got = run_flash(q, k, v, dout, spec_for(q, k, v, kwargs))
    assert_matches_reference(got, run_reference_f64(q, k, v, dout, kwargs), TOL[np.float64])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_deterministic(dtype):
    """No atomics: two runs give the same bits."""
    q, k, v, dout, kwargs = mixed_case(dtype)
    spec = spec_for(q, k, v, kwargs)
    first = run_flash(q, k, v, dout, spec)
    second = run_flash(q, k, v, dout, spec)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


def test_device_arrays_stay_on_the_device():
    q, k, v, dout, kwargs = mixed_case()
    spec = spec_for(q, k, v, kwargs)
    host = run_flash(q, k, v, dout, spec)

    q_d, k_d, v_d, dout_d = (flash.to_device(x) for x in (q, k, v, dout))
    assert all(flash.is_device_array(x) for x in (q_d, k_d, v_d, dout_d))
    out_d, lse_d = flash.forward(q_d, k_d, v_d, spec)
    assert flash.is_device_array(out_d) and flash.is_device_array(lse_d)
    grads_d = flash.backward(q_d, k_d, v_d, out_d, lse_d, dout_d, spec)
    assert all(flash.is_device_array(g) for g in grads_d)

    for a, b in zip(host, (out_d, lse_d) + tuple(grads_d)):
        b = flash.to_host(b)
        assert isinstance(b, np.ndarray)
        assert np.array_equal(a, b)
    assert flash.to_host(q) is q and flash.to_device(q_d) is q_d


def test_simulator_or_gpu_is_available():
    assert flash.unavailable_reason() is None


def test_benchmark_script_runs_a_tiny_size():
    """benchmarks/gpu_flash.py parses its arguments and times one tiny size (not dead code)."""
    path = ROOT / "benchmarks" / "gpu_flash.py"
    module_spec = importlib.util.spec_from_file_location("gpu_flash", path)
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    rows = bench.main(["--n", "16", "--d", "8", "--heads", "1", "--batch", "1",
                       "--dtype", "float32", "--repeats", "1", "--no-torch",
                       "--resident", "8", "--staged", "4"])
    assert len(rows) == 2  # non-causal and causal
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    assert all(r["max_rel_err"] < 1e-5 for r in rows)
    assert flash.TILES_OVERRIDE is None  # the benchmark puts the default tiles back
