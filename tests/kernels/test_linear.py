"""Linear attention kernels (``linear_reference`` and ``cpu.linear``) against independent oracles.

* forward: a dense O(N^2) formula written here (the full phi(Q) phi(K)^T matrix, the
  causal mask, row-normalised), on the odd sizes of ``tests/grid.py``;
* gradients: float64 central finite differences of that dense formula with a random
  cotangent (small sizes), and numba against the reference on the whole grid;
* empty rows (causal with Nq > Nk), chunk boundaries, bit-identical reruns.

Gradient errors are measured against the size of the terms being summed, not only the
size of the result: with one key, ``out = v A / (A + eps)`` barely depends on q, and
dq is an eps-sized difference of two O(1) terms. Relative to itself it can only be
computed to ``precision / eps``; relative to the terms it is as exact as anything else.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from microattn.kernels import linear_reference
from microattn.kernels.cpu import linear as linear_numba
from microattn.kernels.spec import make_linear_spec
from tests.grid import (
    HEADS, NAN_SOURCES, SIZES, UNEQUAL, Case, check_nan_propagation, nan_dependents, nan_inputs, rel_err,
)

NUMBA_MISSING = linear_numba.unavailable_reason()
needs_numba = pytest.mark.skipif(NUMBA_MISSING is not None, reason=str(NUMBA_MISSING))

# name -> (forward, backward); the chunk-8 entry puts many chunk boundaries in small sizes
BACKENDS = {
    "reference": (linear_reference.forward, linear_reference.backward),
    "numba": (linear_numba.forward, linear_numba.backward),
    "numba-chunk8": (functools.partial(linear_numba.forward, chunk=8),
                     functools.partial(linear_numba.backward, chunk=8)),
    "numba-loops": (linear_numba.forward_loops, linear_numba.backward_loops),
}
NUMBA_BACKENDS = [name for name in BACKENDS if name.startswith("numba")]


def backend_params(names):
    return [pytest.param(n, marks=needs_numba if n.startswith("numba") else (), id=n) for n in names]


TOL = {np.float64: 1e-9, np.float32: 1e-5}


def f64(x):
    return np.asarray(x, dtype=np.float64)


# -- the dense oracle ------------------------------------------------------------------------


def phi(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def phi_grad(x):
    return np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0)))


def dense_weights(q, k, causal):
    """A (B, Hq, Nq, Nk) = phi(q_i) . phi(k_j), zero where causal forbids the pair (float64)."""
    q, k = f64(q), f64(k)
    group = q.shape[1] // k.shape[1]
    A = np.einsum("bhid,bhjd->bhij", phi(q), np.repeat(phi(k), group, axis=1))
    if causal:
        Nq, Nk = q.shape[2], k.shape[2]
        i, j = np.arange(Nq)[:, None], np.arange(Nk)[None, :]
        A = A * (j <= i + (Nk - Nq))  # bottom-right aligned
    return A


def dense_linear_attention(q, k, v, causal, eps):
    """out_i = sum_j A_ij v_j / (sum_j A_ij + eps), in float64, O(N^2) memory on purpose."""
    A = dense_weights(q, k, causal)
    v = np.repeat(f64(v), q.shape[1] // k.shape[1], axis=1)
    return (A @ v) / (A.sum(axis=-1, keepdims=True) + eps)


def gradient_term_scales(q, k, v, dout, causal, eps):
    """The largest |term| summed into each of dq, dk, dv (the float error is relative to these).

    From the dense form: dA_ij = (dout_i . v_j - dout_i . out_i) / den_i, then
    dq = (dA @ phi(K)) phi'(q), dk = (dA^T @ phi(Q)) phi'(k), dv = (A / den)^T @ dout;
    the same products with every term replaced by its absolute value.
    """
    q, k, v, dout = (f64(x) for x in (q, k, v, dout))
    group = q.shape[1] // k.shape[1]
    A = dense_weights(q, k, causal)
    den = A.sum(axis=-1, keepdims=True) + eps
    v_all = np.repeat(v, group, axis=1)
    out = (A @ v_all) / den
    # |dout_i . v_j| + |dout_i . out_i|, not |their difference|: the difference is what cancels
    dA = (np.abs(dout @ v_all.swapaxes(-1, -2)) + np.abs((dout * out).sum(-1, keepdims=True))) / den
    dA = np.where(A > 0, dA, 0.0)

    def per_kv_head(x):  # (B, Hq, Nk, X) -> (B, Hkv, Nk, X)
        return x.reshape(x.shape[0], -1, group, *x.shape[2:]).sum(axis=2)

    scale_q = np.abs(dA @ np.repeat(phi(k), group, axis=1) * phi_grad(q)).max()
    scale_k = np.abs(per_kv_head(dA.swapaxes(-1, -2) @ phi(q)) * phi_grad(k)).max()
    scale_v = np.abs(per_kv_head((A / den).swapaxes(-1, -2) @ np.abs(dout))).max()
    return scale_q, scale_k, scale_v


def grad_err(actual, expected, term_scale):
    """rel_err, but relative to max(|expected|, the largest summed term)."""
    if np.isnan(actual).any():
        return np.inf
    diff = np.abs(f64(actual) - f64(expected)).max(initial=0.0)
    scale = max(np.abs(expected).max(initial=0.0), term_scale)
    return diff / scale if scale > 0 else diff


# -- inputs ----------------------------------------------------------------------------------


def make_case(Nq, Nk, Hq=4, Hkv=4, D=8, Dv=5, B=2, causal=False, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, Nq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nk, Dv)).astype(dtype)
    dout = rng.standard_normal((B, Hq, Nq, Dv)).astype(dtype)
    spec = make_linear_spec(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), causal=causal)
    return q, k, v, dout, spec


def grid_cases():
    """Every length pair of the shared grid (equal and unequal), heads and D != Dv rotating."""
    pairs = [(n, n) for n in SIZES] + list(UNEQUAL)
    heads = itertools.cycle(HEADS)
    dims = itertools.cycle(((8, 5), (3, 16), (6, 4)))
    return [(nq, nk, *next(heads), *next(dims)) for nq, nk in pairs]


GRID = grid_cases()
GRID_IDS = [f"Nq{c[0]}-Nk{c[1]}-H{c[2]}_{c[3]}-D{c[4]}_{c[5]}" for c in GRID]


# -- forward against the dense formula ---------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", GRID, ids=GRID_IDS)
def test_forward_matches_dense(case, causal, dtype, backend):
    Nq, Nk, Hq, Hkv, D, Dv = case
    q, k, v, _, spec = make_case(Nq, Nk, Hq, Hkv, D, Dv, causal=causal, dtype=dtype)
    forward, _ = BACKENDS[backend]
    out = forward(q, k, v, spec)
    assert out.shape == (2, Hq, Nq, Dv) and out.dtype == dtype
    assert rel_err(out, dense_linear_attention(q, k, v, causal, spec.eps)) < TOL[dtype]


# -- gradients -----------------------------------------------------------------------------------


def finite_difference_grads(q, k, v, dout, causal, eps, h=1e-6):
    """d(sum(out * dout))/d(q, k, v) by float64 central differences of the dense formula."""
    grads = []
    for x in (q, k, v):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            saved = x[idx]
            x[idx] = saved + h
            up = np.sum(dense_linear_attention(q, k, v, causal, eps) * dout)
            x[idx] = saved - h
            down = np.sum(dense_linear_attention(q, k, v, causal, eps) * dout)
            x[idx] = saved
            g[idx] = (up - down) / (2 * h)
        grads.append(g)
    return grads


FD_SHAPES = [(5, 5), (3, 6), (6, 3), (1, 4), (4, 1)]


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", FD_SHAPES, ids=[f"Nq{a}-Nk{b}" for a, b in FD_SHAPES])
def test_gradients_match_finite_differences(shape, causal, backend):
    Nq, Nk = shape
    q, k, v, dout, spec = make_case(Nq, Nk, Hq=2, Hkv=1, D=3, Dv=4, B=1, causal=causal, seed=1)
    forward, backward = BACKENDS[backend]
    out = forward(q, k, v, spec)
    grads = backward(q, k, v, out, dout, spec)
    expected = finite_difference_grads(q, k, v, dout, causal, spec.eps)
    scales = gradient_term_scales(q, k, v, dout, causal, spec.eps)
    for name, g, fd, s in zip("qkv", grads, expected, scales):
        assert g.shape == fd.shape, name
        assert grad_err(g, fd, s) < 1e-6, f"d{name}"


@pytest.mark.parametrize("backend", backend_params(NUMBA_BACKENDS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", GRID, ids=GRID_IDS)
def test_numba_backward_matches_reference(case, causal, dtype, backend):
    Nq, Nk, Hq, Hkv, D, Dv = case
    q, k, v, dout, spec = make_case(Nq, Nk, Hq, Hkv, D, Dv, causal=causal, dtype=dtype)
    forward, backward = BACKENDS[backend]
    grads = backward(q, k, v, forward(q, k, v, spec), dout, spec)
    # the reference in float64 on the same (possibly float32) inputs
    q64, k64, v64, dout64 = (f64(x) for x in (q, k, v, dout))
    spec64 = make_linear_spec(q.shape, k.shape, v.shape, (np.dtype(np.float64),) * 3, causal=causal)
    expected = linear_reference.backward(q64, k64, v64, linear_reference.forward(q64, k64, v64, spec64),
                                         dout64, spec64)
    scales = gradient_term_scales(q, k, v, dout, causal, spec.eps)
    for name, g, ref, s, x in zip("qkv", grads, expected, scales, (q, k, v)):
        assert g.shape == x.shape and g.dtype == dtype, name
        assert grad_err(g, ref, s) < TOL[dtype], f"d{name}"


# -- NaN inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("source", NAN_SOURCES)
@pytest.mark.parametrize("shape", [(37, 37), (7, 37), (37, 7)], ids=["Nq37-Nk37", "Nq7-Nk37", "Nq37-Nk7"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_inputs_give_nan_outputs(causal, shape, source, dtype, backend):
    """Every output that depends on a NaN input is NaN (phi(NaN) is NaN, also in the float32
    exp); the rules are the softmax attention's (tests/grid.py), with causal as 'j <= i + Nk - Nq'."""
    Nq, Nk = shape
    q, k, v, dout, _, row = nan_inputs(Case(Nq, Nk, 2, 1, D=8, Dv=5, B=1), dtype, source)
    spec = make_linear_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, causal=causal)
    forward, backward = BACKENDS[backend]

    def run(q, k, v):
        out = forward(q, k, v, spec)
        return dict(zip(("out", "dq", "dk", "dv"), (out,) + tuple(backward(q, k, v, out, dout, spec))))

    i, j = np.arange(Nq)[:, None], np.arange(Nk)[None, :]
    allowed = np.broadcast_to(j <= i + (Nk - Nq) if causal else np.ones((Nq, Nk), bool), (1, 2, Nq, Nk))
    must = nan_dependents(allowed, 2, source, row)
    clean = run(*(np.nan_to_num(x, nan=0.0) for x in (q, k, v)))
    check_nan_propagation(run(q, k, v), clean, must, 1e-4 if dtype == np.float32 else 1e-10, source, row)


# -- rows with no key ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(9, 4), (5, 1), (113, 37)], ids=["Nq9-Nk4", "Nq5-Nk1", "Nq113-Nk37"])
def test_causal_rows_without_keys_are_zero(shape, dtype, backend):
    """Causal with Nq > Nk: queries i < Nq - Nk see no key -> out 0, dq 0, nothing NaN."""
    Nq, Nk = shape
    q, k, v, dout, spec = make_case(Nq, Nk, Hq=4, Hkv=2, causal=True, dtype=dtype)
    forward, backward = BACKENDS[backend]
    out = forward(q, k, v, spec)
    dq, dk, dv = backward(q, k, v, out, dout, spec)
    empty = Nq - Nk
    for x in (out, dq, dk, dv):
        assert np.isfinite(x).all()
    assert not out[:, :, :empty].any()
    assert not dq[:, :, :empty].any()
    assert out[:, :, empty:].any()  # the rest is a real result
    # the empty rows' cotangent must not leak into dk, dv
    dout_masked = dout.copy()
    dout_masked[:, :, :empty] = 0
    _, dk2, dv2 = backward(q, k, v, out, dout_masked, spec)
    assert rel_err(dk2, dk) < TOL[dtype] and rel_err(dv2, dv) < TOL[dtype]


# -- chunk boundaries --------------------------------------------------------------------------------

CHUNK = linear_numba.CHUNK
CHUNK_SHAPES = [(CHUNK - 1, CHUNK - 1), (CHUNK, CHUNK), (CHUNK + 1, CHUNK + 1), (2 * CHUNK + 3, 2 * CHUNK + 3),
                (CHUNK + 1, 3 * CHUNK - 5), (3 * CHUNK - 5, CHUNK + 1)]


@needs_numba
@pytest.mark.parametrize("chunk", [1, 7, CHUNK], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=[f"Nq{a}-Nk{b}" for a, b in CHUNK_SHAPES])
def test_chunk_boundaries(shape, causal, chunk):
    """N < chunk, N = chunk, chunk + 1, not a multiple, and offsets that cut chunks in two."""
    Nq, Nk = shape
    q, k, v, dout, spec = make_case(Nq, Nk, Hq=2, Hkv=1, D=4, Dv=3, B=1, causal=causal)
    out = linear_numba.forward(q, k, v, spec, chunk=chunk)
    assert rel_err(out, dense_linear_attention(q, k, v, causal, spec.eps)) < 1e-9
    grads = linear_numba.backward(q, k, v, out, dout, spec, chunk=chunk)
    expected = linear_reference.backward(q, k, v, linear_reference.forward(q, k, v, spec), dout, spec)
    for name, g, ref in zip("qkv", grads, expected):
        assert rel_err(g, ref) < 1e-9, f"d{name}"


@needs_numba
def test_chunk_must_be_positive():
    q, k, v, _, spec = make_case(3, 3)
    with pytest.raises(ValueError, match="chunk"):
        linear_numba.forward(q, k, v, spec, chunk=0)


# -- determinism -----------------------------------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_numba_is_bit_identical_over_reruns(dtype, causal):
    q, k, v, dout, spec = make_case(300, 300, Hq=4, Hkv=2, D=16, Dv=8, causal=causal, dtype=dtype)
    out = linear_numba.forward(q, k, v, spec)
    grads = linear_numba.backward(q, k, v, out, dout, spec)
    for _ in range(20):
        assert np.array_equal(linear_numba.forward(q, k, v, spec), out)
        for g_again, g in zip(linear_numba.backward(q, k, v, out, dout, spec), grads):
            assert np.array_equal(g_again, g)


# -- inputs are not modified; non-contiguous inputs work ------------------------------------------


@pytest.mark.parametrize("backend", backend_params(["reference", "numba"]))
def test_inputs_untouched_and_views_accepted(backend):
    q, k, v, dout, spec = make_case(37, 37, Hq=4, Hkv=2, causal=True)
    forward, backward = BACKENDS[backend]
    copies = [x.copy() for x in (q, k, v, dout)]
    out = forward(q, k, v, spec)
    grads = backward(q, k, v, out, dout, spec)
    for x, saved in zip((q, k, v, dout), copies):
        assert np.array_equal(x, saved)
    # the same arrays, stored transposed (non-contiguous views)
    views = [np.ascontiguousarray(x.swapaxes(2, 3)).swapaxes(2, 3) for x in (q, k, v, dout)]
    out_v = forward(*views[:3], spec)
    assert rel_err(out_v, out) < 1e-12
    for g_v, g in zip(backward(*views[:3], out_v, views[3], spec), grads):
        assert rel_err(g_v, g) < 1e-12
