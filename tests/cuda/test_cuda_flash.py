"""numba.cuda flash attention against the NumPy reference, on the shared case grid.

Runs under the simulator (``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda``) or a GPU.
The simulator runs every GPU thread as a Python thread, so the grid is shrunk to lengths
1, 7, 37 (several 8-row tiles and ragged edges) and batch 1 where the masking allows; every
masking regime (masks, windows, empty rows, dropout, large logits, huge finite masks),
GQA/MQA and Dv != D stay. Errors are judged by the one yardstick of tests/grid.py
(``check_against_reference``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest

from microattn.kernels import reference
from microattn.kernels.cuda import flash
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
    check_against_reference(flash, case, dtype)


def mixed_inputs(dtype=np.float64):
    """q, k, v, dout, spec: GQA, Dv != D, a float mask with -inf, a window and dropout at once."""
    case = Case(37, 29, Hq=4, Hkv=2, D=8, Dv=5, B=1, masking="float_mask")
    q, k, v, dout, kwargs = make_inputs(case, dtype, seed=3)
    kwargs.update(window=(9, 4), dropout_p=0.25, seed=99)
    return q, k, v, dout, spec_for(q, k, v, kwargs)


def test_everything_at_once_matches_reference():
    q, k, v, dout, spec = mixed_inputs()
    got = run_kernel(flash, q, k, v, dout, spec)
    want = run_kernel(reference, q, k, v, dout, spec)
    for name in NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("source", NAN_SOURCES)
@pytest.mark.parametrize("case", [NAN_CASES[1], NAN_CASES[3], NAN_CASES[4]], ids=lambda c: c.id)
def test_nan_inputs_give_nan_outputs(case, source):
    """As tests/kernels/test_cpu_flash.py: every output that depends on a NaN input is NaN."""
    q, k, v, dout, kwargs, row = nan_inputs(case, np.float32, source)
    spec = spec_for(q, k, v, kwargs)
    got = run_kernel(flash, q, k, v, dout, spec)
    clean = run_kernel(flash, *(np.nan_to_num(x, nan=0.0) for x in (q, k, v)), dout, spec)
    allowed = np.broadcast_to(reference.allowed_pairs(spec), (spec.B, spec.Hq, spec.Nq, spec.Nk))
    must = nan_dependents(allowed, spec.Hq // spec.Hkv, source, row)
    check_nan_propagation(got, clean, must, 1e-4, source, row)


@pytest.mark.parametrize("tiles", [flash.Tiles(resident=4, staged=16),
                                   flash.Tiles(resident=16, staged=4)], ids=str)
def test_other_tile_shapes(tiles, monkeypatch):
    """Resident and staged tiles of different sizes: loops and band skipping stay exact."""
    monkeypatch.setattr(flash, "TILES_OVERRIDE", tiles)
    q, k, v, dout, spec = mixed_inputs()
    got = run_kernel(flash, q, k, v, dout, spec)
    want = run_kernel(reference, q, k, v, dout, spec)
    for name in NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("D, Dv", [(64, 128), (128, 32)])
def test_large_head_dims(D, Dv):
    check_against_reference(flash, Case(7, 9, Hq=2, Hkv=1, D=D, Dv=Dv, B=1, masking="causal"),
                            np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_deterministic(dtype):
    """No atomics: two runs give the same bits."""
    q, k, v, dout, spec = mixed_inputs(dtype)
    first = run_kernel(flash, q, k, v, dout, spec)
    second = run_kernel(flash, q, k, v, dout, spec)
    for name in NAMES:
        assert np.array_equal(first[name], second[name]), name


def test_stats_are_the_row_max_and_sum():
    """stats (2, B, Hq, Nq) = (m, l): m the row max of the scores, l = sum exp(s - m);
    -inf and 0 on a row that allows no key (the protocol, kernels/protocol.py)."""
    case = Case(9, 7, Hq=2, Hkv=1, B=1, masking="empty_rows")  # Nq > Nk: causal empties rows
    q, k, v, dout, kwargs = make_inputs(case, np.float64)
    spec = spec_for(q, k, v, kwargs)
    _, stats = flash.forward(q, k, v, spec)
    _, want = reference.forward(q, k, v, spec)
    assert stats.shape == (2, spec.B, spec.Hq, spec.Nq) and stats.dtype == np.float64
    empty = want[1] == 0
    assert empty.any() and (~empty).any()
    assert np.isneginf(stats[0][empty]).all() and (stats[1][empty] == 0).all()
    np.testing.assert_allclose(stats[:, ~empty], want[:, ~empty], rtol=1e-12)


def test_device_arrays_stay_on_the_device():
    q, k, v, dout, spec = mixed_inputs()
    out, stats = flash.forward(q, k, v, spec)
    host = (out, stats) + tuple(flash.backward(q, k, v, out, stats, dout, spec))

    q_d, k_d, v_d, dout_d = (flash.to_device(x) for x in (q, k, v, dout))
    assert all(flash.is_device_array(x) for x in (q_d, k_d, v_d, dout_d))
    out_d, stats_d = flash.forward(q_d, k_d, v_d, spec)
    assert flash.is_device_array(out_d) and flash.is_device_array(stats_d)
    grads_d = flash.backward(q_d, k_d, v_d, out_d, stats_d, dout_d, spec)
    assert all(flash.is_device_array(g) for g in grads_d)

    for a, b in zip(host, (out_d, stats_d) + tuple(grads_d)):
        b = flash.to_host(b)
        assert isinstance(b, np.ndarray)
        assert np.array_equal(a, b)
    assert flash.to_host(q) is q and flash.to_device(q_d) is q_d


def test_no_kernel_takes_more_than_twelve_arguments():
    functions = flash.kernel_functions("float32", 8, 8, flash.SIM_TILES, True, True)
    counts = {name: len(inspect.signature(fn).parameters) for name, fn in functions.items()}
    assert max(counts.values()) <= 12, counts


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
