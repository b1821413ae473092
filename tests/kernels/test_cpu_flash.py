"""The numba CPU flash kernels (kernels/cpu/flash.py) and their ladder (kernels/cpu/ladder.py)
against the NumPy reference, on the shared case grid.

How errors are measured. ``rel_err`` divides by the largest expected value, which breaks
down where a gradient is zero up to rounding (one key: p = 1, so ds = p * (dp - delta) = 0)
or cancels (large logits: p is one-hot). So every output is divided by
``max(max |expected|, natural scale)``, the natural scale being the size of the terms that
sum to it (e.g. ``scale * |q| * |dout| * |v|`` for dk): an error of a few ulps of those terms
is rounding, however small the result.

* float64: within 1e-9 of the float64 reference.
* float32: the float64 reference on the same (float32-rounded) inputs is the truth; the
  kernel must be within 4x the float32 reference's own error, floored at 1e-6.
* lse: -inf exactly where the reference's is -inf, the same tolerance elsewhere.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest

from microattn.kernels import reference
from microattn.kernels.cpu import flash
from microattn.kernels.spec import AttentionSpec, make_attention_spec
from tests.grid import (
    NAN_CASES, NAN_SOURCES, Case, check_nan_propagation, grid, make_inputs, nan_dependents, nan_inputs,
)

if flash.unavailable_reason() is not None:  # numba is a dependency: its absence is a failure
    pytest.fail(f"the numba CPU kernels cannot run: {flash.unavailable_reason()}", pytrace=False)

from microattn.kernels.cpu import ladder  # noqa: E402

CASES = grid()
SMALL_CASES = grid(max_n=37)  # the slow rungs run on the cases with N <= 37
DTYPES = [np.float64, np.float32]
NAMES = ("out", "lse", "dq", "dk", "dv")


def build(case: Case, dtype, seed=0):
    q, k, v, dout, kwargs = make_inputs(case, dtype, seed=seed)
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, **kwargs)
    return q, k, v, dout, spec


def run(module, q, k, v, dout, spec):
    """out, lse, dq, dk, dv of one kernel module; backward sees its own forward's out, lse."""
    out, lse = module.forward(q, k, v, spec)
    return (out, lse) + tuple(module.backward(q, k, v, out, lse, dout, spec))


def flash_variant(fused: bool, blocks=(flash.BLOCK_M, flash.BLOCK_N)):
    """flash with the backward pass and the tile size pinned (tiny tiles cross many edges)."""
    return SimpleNamespace(forward=partial(flash.forward, blocks=blocks),
                           backward=partial(flash.backward, fused=fused, blocks=blocks))


TINY = (16, 24)  # BLOCK_M, BLOCK_N: every grid case with N > 16 spans several tiles


def natural_scales(q, k, v, dout, spec: AttentionSpec):
    """The size of the terms each output is a sum of (see the module docstring)."""
    aq, ak, av, ado = (float(np.abs(x).max()) for x in (q, k, v, dout))
    drop = spec.dropout_scale if spec.dropout_p > 0 else 1.0
    return {
        "out": drop * av,
        "lse": 1.0 + spec.scale * aq * ak,
        "dq": drop * spec.scale * ak * ado * av,
        "dk": drop * spec.scale * aq * ado * av,
        "dv": drop * ado,
    }


def errors(got, want, scales):
    """Normalised max error per output; lse compared where finite, inf if -inf differs."""
    result = {}
    for name, a, e in zip(NAMES, got, want):
        a = np.asarray(a, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        if np.isnan(a).any():
            result[name] = np.inf
            continue
        if name == "lse":
            if not np.array_equal(np.isneginf(a), np.isneginf(e)):
                result[name] = np.inf
                continue
            finite = np.isfinite(e)
            a, e = a[finite], e[finite]
        denominator = max(np.abs(e).max(initial=0.0), scales[name])
        result[name] = np.abs(a - e).max(initial=0.0) / denominator
    return result


def check_against_reference(case: Case, dtype, module):
    q, k, v, dout, spec = build(case, dtype)
    got = run(module, q, k, v, dout, spec)
    if dtype == np.float64:
        want = run(reference, q, k, v, dout, spec)
        err = errors(got, want, natural_scales(q, k, v, dout, spec))
        assert max(err.values()) <= 1e-9, err
        return
    # float32: measure both against the float64 reference on the same rounded inputs
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    spec64 = make_attention_spec(q64.shape, k64.shape, v64.shape, (np.float64,) * 3,
                                 **_spec_kwargs(spec))
    truth = run(reference, q64, k64, v64, do64, spec64)
    scales = natural_scales(q64, k64, v64, do64, spec64)
    ours = errors(got, truth, scales)
    ref32 = errors(run(reference, q, k, v, dout, spec), truth, scales)
    for name in NAMES:
        assert ours[name] <= 4 * max(ref32[name], 1e-6), (name, ours, ref32)


def _spec_kwargs(spec: AttentionSpec) -> dict:
    """make_attention_spec arguments that rebuild ``spec`` (the bias goes in as a float mask)."""
    window = (spec.window_left, spec.window_right)
    return dict(attn_mask=None if spec.bias is None else spec.bias.astype(np.float64),
                dropout_p=spec.dropout_p, seed=spec.seed, scale=spec.scale,
                window=window if spec.has_band else None)


# -- rung 3, the "numba" backend: every grid case, both dtypes, both backward passes -------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_flash_matches_reference(case, dtype):
    check_against_reference(case, dtype, flash)  # what the backend runs
    check_against_reference(case, dtype, flash_variant(fused=False, blocks=TINY))
    check_against_reference(case, dtype, flash_variant(fused=True, blocks=TINY))


LARGE = [
    Case(1000, 1000, 2, 1, 64, 64, B=1, masking="window", window=(255, 0)),
    Case(1000, 1000, 2, 2, 64, 64, B=1, masking="window", window=(100, 37)),
    Case(777, 1000, 2, 1, 64, 48, B=1, masking="causal"),
    Case(300, 1000, 2, 2, 64, 64, B=1, masking="dropout+causal"),
    Case(400, 400, 2, 1, 64, 64, B=1, masking="bool_mask"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", LARGE, ids=lambda c: c.id)
def test_flash_multi_block(case, dtype):
    """Sizes spanning several BLOCK_M x BLOCK_N tiles: the band-skipping and full-tile paths."""
    check_against_reference(case, dtype, flash_variant(fused=False))
    check_against_reference(case, dtype, flash_variant(fused=True))


DETERMINISM = [
    Case(203, 113, 4, 2, 8, 5, masking="dropout"),  # GQA + dropout
    Case(300, 300, 4, 1, 16, 16, masking="dropout+causal"),  # MQA, several tiles
    Case(203, 203, 4, 2, 8, 8, masking="window", window=(40, -1)),
]


@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("case", DETERMINISM, ids=lambda c: c.id)
def test_backward_bit_identical_over_reruns(case, fused):
    q, k, v, dout, spec = build(case, np.float32)
    out, lse = flash.forward(q, k, v, spec)
    kernel = flash_variant(fused, blocks=(64, 64))  # several tiles per head
    first = kernel.backward(q, k, v, out, lse, dout, spec)
    for _ in range(20):
        again = kernel.backward(q, k, v, out, lse, dout, spec)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_empty_rows_are_zero_and_never_nan(dtype):
    # causal with Nq > Nk: the first Nq - Nk queries see no key; a window that ends
    # before key 0 empties more; huge logits on the rest
    q, k, v, dout, _ = make_inputs(Case(300, 140, 4, 2, 64, 64, B=1), dtype)
    q = q * 100
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, window=(20, 0))
    empty = np.arange(300) < 160
    for fused in (False, True):
        out, lse, dq, dk, dv = run(flash_variant(fused, blocks=(64, 64)), q, k, v, dout, spec)
        for x in (out, lse, dq, dk, dv):
            assert not np.isnan(x).any()
        assert np.all(out[:, :, empty] == 0) and np.all(dq[:, :, empty] == 0)
        assert np.all(np.isneginf(lse[:, :, empty])) and np.all(np.isfinite(lse[:, :, ~empty]))


NAN_MODULES = {
    "reference": reference,
    "flash": flash,
    "flash-split-tiny": flash_variant(False, blocks=TINY),
    "flash-fused-tiny": flash_variant(True, blocks=TINY),
}


@pytest.mark.parametrize("source", NAN_SOURCES)
@pytest.mark.parametrize("case", NAN_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(NAN_MODULES))
def test_nan_inputs_give_nan_outputs(name, dtype, case, source):
    """A NaN in q, k or v makes every output that depends on it NaN, as in NumPy and
    PyTorch: never a finite answer computed as if the NaN were not there (a row whose
    running sum is NaN is not an empty row)."""
    check_nan_inputs(NAN_MODULES[name], case, dtype, source)


@pytest.mark.parametrize("source", NAN_SOURCES)
@pytest.mark.parametrize("rung", [1, 2])
def test_ladder_nan_inputs_give_nan_outputs(rung, source):
    for case in NAN_CASES[:3]:
        check_nan_inputs(ladder.RUNGS[rung], case, np.float64, source)


def check_nan_inputs(module, case, dtype, source):
    q, k, v, dout, kwargs, row = nan_inputs(case, dtype, source)
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, **kwargs)
    got = run(module, q, k, v, dout, spec)
    clean = run(module, *(np.nan_to_num(x, nan=0.0) for x in (q, k, v)), dout, spec)
    allowed = np.broadcast_to(reference.allowed_pairs(spec), (spec.B, spec.Hq, spec.Nq, spec.Nk))
    must = nan_dependents(allowed, spec.Hq // spec.Hkv, source, row)
    check_nan_propagation(dict(zip(NAMES, got)), dict(zip(NAMES, clean)), must, 1e-4 if dtype == np.float32 else 1e-10, source, row)


def test_any_strides_in():
    q, k, v, dout, spec = build(Case(113, 37, 4, 2, 8, 5, masking="causal"), np.float64)
    views = [np.asfortranarray(x)[..., ::1] for x in (q, k, v, dout)]
    strided = [np.repeat(x, 2, axis=-1)[..., ::2] for x in views]  # non-contiguous, same values
    got = run(flash, *strided, spec)
    want = run(flash, q, k, v, dout, spec)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_band_ranges_match_the_spec():
    """The compiled key_range / query_range (what band-skipping loops over) are the spec's."""
    for nq, nk in ((1, 1), (7, 37), (37, 7), (64, 64), (300, 129)):
        for window in (None, (0, 0), (3, 0), (16, 16), (40, -1), (-1, 5), (255, 0)):
            for causal in (False, True):
                spec = make_attention_spec((1, 1, nq, 4), (1, 1, nk, 4), (1, 1, nk, 4),
                                           (np.float64,) * 3, window=window, is_causal=causal)
                band = (spec.offset, spec.window_left, spec.window_right)
                for lo in range(0, max(nq, nk), 5):
                    for width in (1, 7, 128):
                        i1, j1 = min(nq, lo + width), min(nk, lo + width)
                        if lo < nq:
                            assert flash.key_range(lo, i1, nk, *band) == spec.key_range(lo, i1)
                        if lo < nk:
                            assert flash.query_range(lo, j1, nq, *band) == spec.query_range(lo, j1)


# -- rungs 1 and 2 of the ladder: the small cases --------------------------------------------


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("rung", [1, 2])
def test_ladder_matches_reference(rung, case):
    """float64 only: the rungs share rung 3's dtype handling, and each dtype is another
    ~15 s of first-run compilation (benchmarks/compare_cpu.py --ladder runs them in float32)."""
    check_against_reference(case, np.float64, ladder.RUNGS[rung])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("growth", [0.0, 0.05, 3.0], ids=["flat", "slow", "steep"])
def test_forward_stale_shift_and_its_fallback(growth, dtype):
    """The forward keeps the shift m_i while later key blocks stay within STALE_LIMIT of it
    and redoes a block the classic way when they do not. Keys whose scores rise along the
    sequence by ``growth`` per key exercise both: flat (always kept), slow (kept, then
    refreshed every few blocks), steep (every block falls back)."""
    rng = np.random.default_rng(3)
    N, D = 200, 16
    q = rng.standard_normal((1, 2, N, D))
    k = rng.standard_normal((1, 2, N, D)) * 0.3
    direction = q.mean(axis=2, keepdims=True)  # a key direction every query agrees with
    k += np.arange(N)[None, None, :, None] * growth * direction / (direction ** 2).sum() * np.sqrt(D)
    v = rng.standard_normal((1, 2, N, D))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3)
    out, lse = flash.forward(q, k, v, spec, blocks=(16, 24))
    r_out, r_lse = reference.forward(*(x.astype(np.float64) for x in (q, k, v)),
                                     make_attention_spec(q.shape, k.shape, v.shape, (np.float64,) * 3))
    if dtype == np.float64:
        bounds = (1e-9 * np.abs(r_out).max(), 1e-9 * np.abs(r_lse).max())
    else:  # large logits: within 4x the float32 reference's own error (as in the grid)
        f_out, f_lse = reference.forward(q, k, v, spec)
        bounds = (4 * np.abs(f_out - r_out).max() + 1e-6, 4 * np.abs(f_lse - r_lse).max() + 1e-6)
    assert np.abs(out - r_out).max() <= bounds[0]
    assert np.abs(lse - r_lse).max() <= bounds[1]
