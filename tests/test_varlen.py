"""Packed variable-length sequences (cu_seqlens): every backend against the dense call with
the equivalent mask (block-diagonal, causal/window bottom-right per sequence), forward and
backward; float64 gradcheck; bad offsets refused."""

from __future__ import annotations

import numpy as np
import pytest
from microattn.kernels.masking import in_band

import microattn as ma
from microattn import functional as F

BACKENDS = ["reference", "composed", "numba"]
LENGTHS = [  # (query lengths, key lengths) of the packed sequences
    ([3, 7, 1, 5], [3, 7, 1, 5]),
    ([2, 0, 6, 4], [5, 3, 6, 9]),     # an empty sequence, more keys than queries (a KV prefix)
    ([4, 3], [0, 3]),                 # a sequence with queries but no keys: zeros, lse -inf
]
CASES = [dict(), dict(is_causal=True), dict(is_causal=True, window=(2, 0)), dict(window=(1, 2)),
         dict(is_causal=True, dropout_p=0.3, seed=11)]


def offsets(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def dense_mask(cu_q, cu_k, is_causal=False, window=None):
    """The (Nq, Nk) boolean mask a dense call needs: same sequence, and the per-sequence band."""
    Nq, Nk = cu_q[-1], cu_k[-1]
    mask = np.zeros((Nq, Nk), dtype=bool)
    left, right = window if window is not None else (-1, -1)
    if is_causal:
        right = 0
    for s in range(len(cu_q) - 1):
        nq, nk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        i, j = np.arange(nq)[:, None], np.arange(nk)[None, :]
        mask[cu_q[s]:cu_q[s + 1], cu_k[s]:cu_k[s + 1]] = in_band((nk - nq, left, right), i, j)
    return mask


def run(backend, q, k, v, dout, dlse, **kw):
    tq, tk, tv = (ma.tensor(x, requires_grad=True) for x in (q, k, v))
    out, lse = F.scaled_dot_product_attention(tq, tk, tv, return_lse=True, backend=backend, **kw)
    finite = np.isfinite(lse.data)
    ((out * dout).sum() + (ma.where(finite, lse, 0.0) * dlse).sum()).backward()
    return out.data, lse.data, tq.grad, tk.grad, tv.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=["equal", "prefix+empty", "no-keys"])
@pytest.mark.parametrize("case", CASES, ids=["full", "causal", "causal-window", "window", "dropout"])
def test_packed_equals_dense_with_the_block_diagonal_mask(backend, lengths, case):
    rng = np.random.default_rng(0)
    cu_q, cu_k = offsets(lengths[0]), offsets(lengths[1])
    Nq, Nk = cu_q[-1], cu_k[-1]
    q = rng.standard_normal((1, 4, Nq, 8))
    k, v = rng.standard_normal((1, 2, Nk, 8)), rng.standard_normal((1, 2, Nk, 6))  # GQA
    dout, dlse = rng.standard_normal((1, 4, Nq, 6)), rng.standard_normal((1, 4, Nq))
    got = run(backend, q, k, v, dout, dlse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **case)
    extra = {key: val for key, val in case.items() if key in ("dropout_p", "seed")}
    mask = dense_mask(cu_q, cu_k, case.get("is_causal", False), case.get("window"))
    want = run("reference", q, k, v, dout, dlse, attn_mask=mask, **extra)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12, err_msg=name)


def test_float32_and_a_float_mask_with_huge_values():
    rng = np.random.default_rng(1)
    cu = offsets([5, 9, 2])
    q, k, v = (rng.standard_normal((1, 2, 16, 8)).astype(np.float32) for _ in range(3))
    mask = rng.standard_normal((16, 16)).astype(np.float32)
    mask[::3, 1::2] = -1e9
    for backend in ("numba", "reference"):
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                             is_causal=True, backend=backend).data
        dense = np.where(dense_mask(cu, cu, True), mask, -np.inf).astype(np.float32)
        want = F.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64),
                                              v.astype(np.float64), attn_mask=dense.astype(np.float64),
                                              backend="reference").data
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_gradcheck_through_packed_sequences():
    rng = np.random.default_rng(2)
    cu_q, cu_k = offsets([2, 3]), offsets([3, 2])
    leaves = [ma.tensor(rng.standard_normal(shape), requires_grad=True)
              for shape in ((1, 2, 5, 3), (1, 1, 5, 3), (1, 1, 5, 3))]
    for backend in BACKENDS:
        assert ma.gradcheck(lambda q, k, v, backend=backend: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend), leaves)


@pytest.mark.parametrize("kw, error, fragment", [
    (dict(cu_seqlens_q=[0, 4]), ValueError, "go together"),
    (dict(cu_seqlens_q=[0, 4], cu_seqlens_k=[0.0, 4.0]), TypeError, "integer array"),
    (dict(cu_seqlens_q=[0, 3], cu_seqlens_k=[0, 4]), ValueError, "from 0 to the packed length 4"),
    (dict(cu_seqlens_q=[0, 3, 2, 4], cu_seqlens_k=[0, 1, 2, 4]), ValueError, "non-decreasing"),
    (dict(cu_seqlens_q=[0, 2, 4], cu_seqlens_k=[0, 4]), ValueError, "same number of sequences"),
    (dict(cu_seqlens_q=[[0, 4]], cu_seqlens_k=[[0, 4]]), ValueError, "1-D offsets"),
])
def test_bad_offsets_are_clear_errors(kw, error, fragment):
    q = np.zeros((1, 1, 4, 2))
    with pytest.raises(error, match=fragment):
        F.scaled_dot_product_attention(q, q, q, **kw)


def test_packed_rows_need_one_batch_row():
    q = np.zeros((2, 1, 4, 2))
    with pytest.raises(ValueError, match="B = 1"):
        F.scaled_dot_product_attention(q, q, q, cu_seqlens_q=[0, 4], cu_seqlens_k=[0, 4])
