"""Rows masked by huge finite values (-1e9, finfo.min, -1e30) on the cuda backend: the padding
masks Hugging Face models build, wholly and partly masked rows, float32 and float64.

The forward stores the row statistics (m, l) and the backward recomputes
``p = exp(s - m) / l`` (``masking.row_shift``), never ``exp(s - lse)``, which loses ``log(l)``
beside ``m ~ -1e9`` and gives every key of such a row p = 1. Oracles, as in
tests/test_padding_rows.py for the CPU backends: the reference kernel in the same dtype (it
computes the same rule, so float32 rows that round to one value agree exactly), the
"composed" backend (Tensor ops, autograd derives the backward), the closed form (the
average of v) and float64 finite differences.

The 6 x 6 problem of issue 11 fits in one 8-row tile under the simulator; the 37 x 29 one
crosses several, so the forward's online softmax rescales rows whose every score is huge.
Both go through ``F.scaled_dot_product_attention(backend="cuda")`` and the kernel module; the
grid's ``huge_mask`` cases (tests/cuda/test_cuda_flash.py) add GQA, Dv != D and other shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

import microattn as ma
from microattn import functional as F
from microattn.kernels import reference
from microattn.kernels.cuda import flash
from microattn.kernels.spec import make_attention_spec
from tests.grid import NAMES, run_kernel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.filterwarnings("ignore:overflow encountered in scalar multiply:RuntimeWarning"),
]

HUGE = {"-1e9": -1e9, "finfo.min": None, "-1e30": -1e30}
DTYPES = [np.float32, np.float64]
SHAPES = {"6x6": (6, 6), "37x29": (37, 29)}  # (Nq, Nk); 37 x 29 crosses several 8-row tiles


def padding_mask(dtype, big, Nq=6, Nk=6):
    """(Nq, Nk): row 2 wholly masked, row 4 masked on its first half, the last row masked on
    its second half, the rest random."""
    value = np.finfo(dtype).min if big is None else big
    mask = np.random.default_rng(1).standard_normal((Nq, Nk))
    mask[2, :] = value
    mask[4, : Nk // 2] = value
    mask[-1, Nk // 2:] = value
    return mask.astype(dtype)


def inputs(dtype, Nq=6, Nk=6, seed=0):
    """q (1, 2, Nq, 4), k (1, 2, Nk, 4), v (1, 2, Nk, 3), dout (1, 2, Nq, 3)."""
    rng = np.random.default_rng(seed)
    shapes = ((1, 2, Nq, 4), (1, 2, Nk, 4), (1, 2, Nk, 3), (1, 2, Nq, 3))
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


def attention_and_grads(backend, q, k, v, dout, mask):
    q, k, v = (ma.tensor(x, requires_grad=True) for x in (q, k, v))
    out, lse = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, return_lse=True)
    out.backward(dout)
    return dict(zip(NAMES, (out.data, lse.data, q.grad, k.grad, v.grad)))


def assert_close(got, want, tol):
    for name in NAMES:
        a, b = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        assert np.isfinite(a).all(), f"{name} is not finite"
        scale = max(np.abs(b).max(), 1.0)
        assert np.abs(a - b).max() <= tol * scale, f"{name}: {np.abs(a - b).max():.3g}"


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("big", list(HUGE), ids=list(HUGE))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_composed(dtype, big, shape):
    Nq, Nk = SHAPES[shape]
    q, k, v, dout = inputs(dtype, Nq, Nk)
    mask = padding_mask(dtype, HUGE[big], Nq, Nk)
    got = attention_and_grads("cuda", q, k, v, dout, mask)
    want = attention_and_grads("composed", q, k, v, dout, mask)
    assert_close(got, want, 1e-12 if dtype == np.float64 else 1e-5)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("big", list(HUGE), ids=list(HUGE))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_matches_reference_in_the_same_dtype(dtype, big, shape):
    """Kernel against kernel, stats included: both store (m, l) and recompute exp(s - m) / l."""
    Nq, Nk = SHAPES[shape]
    q, k, v, dout = inputs(dtype, Nq, Nk)
    mask = padding_mask(dtype, HUGE[big], Nq, Nk)
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, attn_mask=mask)
    got = run_kernel(flash, q, k, v, dout, spec)
    want = run_kernel(reference, q, k, v, dout, spec)
    assert_close(got, want, 1e-12 if dtype == np.float64 else 1e-5)
    stats, want_stats = flash.forward(q, k, v, spec)[1], reference.forward(q, k, v, spec)[1]
    np.testing.assert_allclose(stats, want_stats, rtol=1e-12 if dtype == np.float64 else 1e-6)


@pytest.mark.parametrize("big", ["finfo.min", "-1e30"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_wholly_masked_row_is_the_average_of_v(dtype, big):
    """Every score of row 2 rounds to the same huge value: out is the plain average of v, and
    dv of every key gets 1/Nk of that row's dout."""
    q, k, v, dout = inputs(dtype)
    mask = padding_mask(dtype, HUGE[big])
    got = attention_and_grads("cuda", q, k, v, dout, mask)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(got["out"][0, :, 2], v[0].mean(axis=1), rtol=tol, atol=tol)
    # row 2 alone: its share of dv is dout[2] / Nk for every key
    only_row_2 = np.zeros_like(dout)
    only_row_2[:, :, 2] = dout[:, :, 2]
    alone = attention_and_grads("cuda", q, k, v, only_row_2, mask)
    want_dv = np.broadcast_to(dout[:, :, 2:3] / v.shape[2], v.shape)
    np.testing.assert_allclose(alone["dv"], want_dv, rtol=tol, atol=tol)


def test_gradcheck_float64_minus_1e9():
    """In float64, -1e9 + q.k keeps q.k to ~1.2e-7 (the ulp of 1e9), so finite differences
    see every gradient; eps = 1e-3 keeps that rounding below gradcheck's tolerance."""
    mask = padding_mask(np.float64, -1e9)
    tensors = [ma.tensor(x, requires_grad=True) for x in inputs(np.float64, seed=3)[:3]]
    assert ma.gradcheck(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cuda"),
        tensors, eps=1e-3)


@pytest.mark.parametrize("big", ["finfo.min", "-1e30"])
def test_gradcheck_float64_value_under_rounded_rows(big):
    """Beside finfo.min or -1e30, q.k rounds away: finite differences of q and k see nothing
    in row 2 while softmax maths give the unrounded function's gradient (docs/semantics.md);
    the value gradient is visible to both."""
    mask = padding_mask(np.float64, HUGE[big])
    q, k, v = inputs(np.float64, seed=3)[:3]
    tensors = [ma.tensor(q), ma.tensor(k), ma.tensor(v, requires_grad=True)]
    assert ma.gradcheck(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cuda"),
        tensors)
