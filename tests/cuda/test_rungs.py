"""Every rung of the numba.cuda ladder on the one harness: rung 1 (``kernels/cuda/flash.py``,
one row per thread) and rung 2 (``kernels/cuda/tiled.py``, register micro-tiles).

Runs under the simulator (``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda``) or a GPU.
The simulator runs every GPU thread as a Python thread, so the grid is shrunk to lengths 1,
7, 37 (several simulator-sized tiles and ragged edges) and batch 1 where the masking allows;
every masking regime of tests/grid.py (masks, windows, empty rows, dropout, large logits,
huge finite masks), GQA/MQA and Dv != D stay, in float64 and float32, judged by the one
yardstick (``grid.check_against_reference``). What only one rung has (its tile shapes, its
budget, its benchmark script) is tested in test_cuda_flash.py / test_cuda_tiled.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from microattn.kernels import reference
from microattn.kernels.cuda import flash, tiled
from microattn.kernels.spec import make_attention_spec
from tests.grid import (
    DLSE_CASES, NAMES, NAN_CASES, NAN_SOURCES, Case, check_against_reference, check_nan_propagation, grid,
    make_inputs, nan_dependents, nan_inputs, run_kernel,
)

pytestmark = [
    pytest.mark.cuda,
    # masking.mix32 multiplies int64 scalars that wrap by design; the simulator runs it on
    # NumPy scalars, which warn about the (intended) wrap-around.
    pytest.mark.filterwarnings("ignore:overflow encountered in scalar multiply:RuntimeWarning"),
]

RUNGS = {"rung1": flash, "rung2": tiled}
DTYPES = [np.float64, np.float32]


def simulator_case(case: Case) -> Case:
    """Batch 1 except where the masking needs two batch entries (key padding of batch 1)."""
    return case if case.masking == "padding_mask" else dataclasses.replace(case, B=1)


CASES = [simulator_case(c) for c in grid(sizes=(1, 7, 37), unequal=((7, 37), (37, 7)))]
rungs = pytest.mark.parametrize("rung", list(RUNGS.values()), ids=list(RUNGS))


def spec_for(q, k, v, kwargs):
    return make_attention_spec(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), **kwargs)


def mixed_inputs(dtype=np.float64):
    """q, k, v, dout, spec: GQA, Dv != D, a float mask with -inf, a window and dropout at once."""
    case = Case(37, 29, Hq=4, Hkv=2, D=8, Dv=5, B=1, masking="float_mask")
    q, k, v, dout, kwargs = make_inputs(case, dtype, seed=3)
    kwargs.update(window=(9, 4), dropout_p=0.25, seed=99)
    return q, k, v, dout, spec_for(q, k, v, kwargs)


def assert_matches_reference(rung, q, k, v, dout, spec, rtol=1e-9):
    got = run_kernel(rung, q, k, v, dout, spec)
    want = run_kernel(reference, q, k, v, dout, spec)
    for name in NAMES:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol * 1e-3, err_msg=name)


@rungs
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, dtype, rung):
    check_against_reference(rung, case, dtype)


# the grid's dlse cases at simulator sizes (lengths <= 13; float_mask keeps its empty row)
SIM_DLSE_CASES = [dataclasses.replace(simulator_case(c), Nq=min(c.Nq, 13), Nk=min(c.Nk, 13))
                  for c in DLSE_CASES]


@rungs
@pytest.mark.parametrize("case", SIM_DLSE_CASES, ids=lambda c: c.id)
def test_dlse_matches_reference(case, rung):
    """A gradient reaching lse, folded into delta by the preprocess kernel."""
    check_against_reference(rung, case, np.float64, with_dlse=True)
    if case.masking == "dropout+causal":
        check_against_reference(rung, case, np.float32, with_dlse=True)


@rungs
def test_everything_at_once_matches_reference(rung):
    assert_matches_reference(rung, *mixed_inputs())


@rungs
@pytest.mark.parametrize("D, Dv", [(64, 128), (128, 32)])
def test_large_head_dims(D, Dv, rung):
    """Head dims the GPU tiles are sized for: many chunks, several fragments of a thread's row."""
    check_against_reference(rung, Case(9, 11, Hq=2, Hkv=1, D=D, Dv=Dv, B=1, masking="causal"), np.float64)


@rungs
@pytest.mark.parametrize("source", NAN_SOURCES)
@pytest.mark.parametrize("case", [NAN_CASES[1], NAN_CASES[3], NAN_CASES[4]], ids=lambda c: c.id)
def test_nan_inputs_give_nan_outputs(case, source, rung):
    """As for every backend: every output that depends on a NaN input is NaN."""
    q, k, v, dout, kwargs, row = nan_inputs(case, np.float32, source)
    spec = spec_for(q, k, v, kwargs)
    got = run_kernel(rung, q, k, v, dout, spec)
    clean = run_kernel(rung, *(np.nan_to_num(x, nan=0.0) for x in (q, k, v)), dout, spec)
    allowed = np.broadcast_to(reference.allowed_pairs(spec), (spec.B, spec.Hq, spec.Nq, spec.Nk))
    must = nan_dependents(allowed, spec.Hq // spec.Hkv, source, row)
    check_nan_propagation(got, clean, must, 1e-4, source, row)


@rungs
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_deterministic(dtype, rung):
    """No atomics, reductions in a fixed order: two runs give the same bits."""
    q, k, v, dout, spec = mixed_inputs(dtype)
    first = run_kernel(rung, q, k, v, dout, spec)
    second = run_kernel(rung, q, k, v, dout, spec)
    for name in NAMES:
        assert np.array_equal(first[name], second[name], equal_nan=True), name


@rungs
def test_device_arrays_stay_on_the_device(rung):
    q, k, v, dout, spec = mixed_inputs()
    host = run_kernel(rung, q, k, v, dout, spec)
    q_d, k_d, v_d, dout_d = (rung.to_device(x) for x in (q, k, v, dout))
    assert all(rung.is_device_array(x) for x in (q_d, k_d, v_d, dout_d))
    out_d, stats_d = rung.forward(q_d, k_d, v_d, spec)
    assert rung.is_device_array(out_d) and rung.is_device_array(stats_d)
    grads_d = rung.backward(q_d, k_d, v_d, out_d, stats_d, dout_d, spec)
    assert all(rung.is_device_array(g) for g in grads_d)
    for name, x in zip(("out", "dq", "dk", "dv"), (out_d,) + tuple(grads_d)):
        x = rung.to_host(x)
        assert isinstance(x, np.ndarray) and np.array_equal(x, host[name]), name
    assert rung.to_host(q) is q and rung.to_device(q_d) is q_d


@rungs
def test_stats_are_the_row_shift_and_sum(rung):
    """stats (2, B, Hq, Nq) = (m, l): l = sum exp(s - m) over the row, so lse = m + log(l);
    -inf and 0 on a row that allows no key (the protocol, kernels/protocol.py)."""
    case = Case(9, 7, Hq=2, Hkv=1, B=1, masking="empty_rows")  # Nq > Nk: causal empties rows
    q, k, v, dout, kwargs = make_inputs(case, np.float64)
    spec = spec_for(q, k, v, kwargs)
    _, stats = rung.forward(q, k, v, spec)
    stats = rung.to_host(stats)
    _, want = reference.forward(q, k, v, spec)
    assert stats.shape == (2, spec.B, spec.Hq, spec.Nq) and stats.dtype == np.float64
    empty = want[1] == 0
    assert empty.any() and (~empty).any()
    assert np.isneginf(stats[0][empty]).all() and (stats[1][empty] == 0).all()
    lse = stats[0][~empty] + np.log(stats[1][~empty])
    np.testing.assert_allclose(lse, want[0][~empty] + np.log(want[1][~empty]), rtol=1e-12)
