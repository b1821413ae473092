"""A differentiable lse (``return_lse=True``) and ``F.merge_attention_states``.

The acceptance test of the attention-features issue: attention over two key halves, each
with ``return_lse=True``, merged, gives the same out, lse and gradients for q, k and v as
attention over all keys, to 1e-11 in float64, on every CPU backend (CUDA: tests/cuda). The
gradient of lse itself is checked against float64 finite differences on every backend, and
the merge against closed forms and finite differences.
"""

import numpy as np
import pytest

import microattn as ma
from microattn import functional as F
from microattn.kernels import merge

BACKENDS = ["reference", "composed", "numba"]


def finite(lse):
    """lse with -inf (rows without a key) replaced by 0, differentiably: what a loss sees."""
    return ma.where(np.isneginf(lse.data), 0.0, lse)


# -- the halves merged are the whole -----------------------------------------------------------

B, HQ, HKV, NQ, NK, D, DV = 2, 4, 2, 6, 11, 3, 4
SPLIT = 5  # keys [0, 5) and [5, 11)


def halves_problem(masking: str, seed=0):
    """q, k, v arrays, a mask (or None) over all keys, and the cotangents of out and lse."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in ((B, HQ, NQ, D), (B, HKV, NK, D), (B, HKV, NK, DV)))
    mask = None
    if masking == "causal":  # bottom-right causal as a boolean mask (halves slice it)
        mask = np.arange(NK)[None, :] <= np.arange(NQ)[:, None] + (NK - NQ)
    elif masking == "bool":  # random, one row allowed nothing, batch 1 sees no key of half a
        mask = rng.random((B, 1, NQ, NK)) < 0.7
        mask[0, 0, 2] = False
        mask[1, :, :, :SPLIT] = False
    elif masking == "float":  # finite biases and some -inf, head by head
        mask = rng.standard_normal((1, HQ, NQ, NK))
        mask[rng.random(mask.shape) < 0.2] = -np.inf
    elif masking == "empty_half":  # half b is fully masked for every query
        mask = np.ones((NQ, NK), dtype=bool)
        mask[:, SPLIT:] = False
    return q, k, v, mask, rng.standard_normal((B, HQ, NQ, DV)), rng.standard_normal((B, HQ, NQ))


def whole_and_merged(backend, masking):
    """(out, lse, dq, dk, dv) of attention over all keys, and of the two halves merged, for
    the loss sum(out * g_out) + sum(finite(lse) * g_lse)."""
    q0, k0, v0, mask, g_out, g_lse = halves_problem(masking)
    results = []
    for split in (False, True):
        q, k, v = (ma.tensor(x, requires_grad=True) for x in (q0, k0, v0))
        if split:
            a, b = slice(0, SPLIT), slice(SPLIT, NK)
            parts = [F.scaled_dot_product_attention(
                q, k[:, :, s], v[:, :, s], attn_mask=None if mask is None else mask[..., s],
                return_lse=True, backend=backend) for s in (a, b)]
            out, lse = F.merge_attention_states(*parts[0], *parts[1])
        else:
            out, lse = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True,
                                                      backend=backend)
        ((out * g_out).sum() + (finite(lse) * g_lse).sum()).backward()
        results.append((out.data, lse.data, q.grad, k.grad, v.grad))
    return results


@pytest.mark.parametrize("masking", ["none", "causal", "bool", "float", "empty_half"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_halves_merged_are_attention_over_all_keys(backend, masking):
    whole, merged = whole_and_merged(backend, masking)
    for name, w, m in zip(("out", "lse", "dq", "dk", "dv"), whole, merged):
        assert np.array_equal(np.isneginf(w), np.isneginf(m)), name
        assert not np.isnan(m).any(), name
        keep = np.isfinite(w)
        np.testing.assert_allclose(m[keep], w[keep], rtol=0, atol=1e-11, err_msg=name)


# -- lse's gradient against finite differences -----------------------------------------------

LSE_CASES = [
    {},
    {"is_causal": True},
    {"window": (1, 2)},
    {"attn_mask": "bool"},  # with a row that allows no key
    {"dropout_p": 0.3, "seed": 7},  # lse is that of the undropped softmax
]


@pytest.mark.parametrize("kwargs", LSE_CASES, ids=[str(sorted(c)) for c in LSE_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_out_and_lse(backend, kwargs):
    rng = np.random.default_rng(1)
    q, k, v = (ma.tensor(rng.standard_normal(s), requires_grad=True)
               for s in ((1, 4, 5, 3), (1, 2, 6, 3), (1, 2, 6, 2)))
    kwargs = {**kwargs}
    if kwargs.get("attn_mask") == "bool":
        mask = rng.random((5, 6)) < 0.6
        mask[3] = False
        kwargs["attn_mask"] = mask

    def fn(q, k, v):
        out, lse = F.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend, **kwargs)
        return out, finite(lse)

    assert ma.gradcheck(fn, [q, k, v], atol=1e-7, rtol=1e-6)


def test_without_return_lse_the_result_is_out_alone():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 3, 4)) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, backend="numba")
    assert isinstance(out, ma.Tensor) and out.shape == (1, 2, 3, 4) and not out.requires_grad
    out2, lse = F.scaled_dot_product_attention(q, k, v, backend="numba", return_lse=True)
    assert np.array_equal(out2.data, out.data) and lse.shape == (1, 2, 3)
    assert not lse.requires_grad


# -- merge_attention_states on its own ----------------------------------------------------------


def test_merge_closed_form():
    lse_a, lse_b = np.array([0.0, 2.0]), np.array([np.log(3.0), 2.0])
    out_a, out_b = np.array([[1.0, 0.0], [4.0, 4.0]]), np.array([[0.0, 1.0], [0.0, 2.0]])
    out, lse = F.merge_attention_states(out_a, lse_a, out_b, lse_b)
    np.testing.assert_allclose(lse.data, [np.log(4.0), 2.0 + np.log(2.0)], rtol=1e-15)
    np.testing.assert_allclose(out.data, [[0.25, 0.75], [2.0, 3.0]], rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_with_empty_parts_never_gives_nan(dtype):
    out_a = ma.tensor(np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], dtype=dtype), requires_grad=True)
    out_b = ma.tensor(np.array([[0.0, 0.0], [5.0, 6.0], [0.0, 0.0]], dtype=dtype), requires_grad=True)
    lse_a = ma.tensor(np.array([1.5, -np.inf, -np.inf], dtype=dtype), requires_grad=True)
    lse_b = ma.tensor(np.array([-np.inf, -2.0, -np.inf], dtype=dtype), requires_grad=True)
    out, lse = F.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and lse.dtype == dtype
    np.testing.assert_array_equal(out.data, [[1.0, 2.0], [5.0, 6.0], [0.0, 0.0]])
    np.testing.assert_array_equal(lse.data, np.array([1.5, -2.0, -np.inf], dtype=dtype))
    (out.sum() + finite(lse).sum()).backward()
    np.testing.assert_array_equal(out_a.grad, [[1, 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(out_b.grad, [[0, 0], [1, 1], [0, 0]])
    for x in (lse_a, lse_b):  # only the lse term reaches the live part: d lse / d lse_x = w_x
        assert not np.isnan(x.grad).any()
    np.testing.assert_array_equal(lse_a.grad, [1, 0, 0])
    np.testing.assert_array_equal(lse_b.grad, [0, 1, 0])


def test_merge_gradcheck():
    rng = np.random.default_rng(3)
    inputs = [ma.tensor(x, requires_grad=True) for x in (
        rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3)) * 2,
        rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3)) * 2)]
    assert ma.gradcheck(F.merge_attention_states, inputs, atol=1e-8, rtol=1e-7)


def test_merge_rows_is_the_sink_and_merge_formula():
    """merge.merge_rows on statistics (m, l): the max, the rescaled sum and the weights."""
    m, l, w_a, w_b = merge.merge_rows(np.array([1.0]), np.array([2.0]), np.array([3.0]), np.array([1.0]))
    np.testing.assert_allclose(m, [3.0])
    np.testing.assert_allclose(l, [2.0 * np.exp(-2.0) + 1.0], rtol=1e-15)
    np.testing.assert_allclose(w_a, [2.0 * np.exp(-2.0) / l[0]], rtol=1e-15)
    np.testing.assert_allclose(w_a + w_b, [1.0], rtol=1e-15)


BAD_MERGES = [
    (ValueError, "out_a and out_b", (np.zeros((2, 3)), np.zeros(2), np.zeros((2, 4)), np.zeros(2))),
    (ValueError, "lse_a and lse_b", (np.zeros((2, 3)), np.zeros(3), np.zeros((2, 3)), np.zeros(2))),
    (ValueError, "lse_a and lse_b", (np.zeros((2, 3)), np.zeros(2), np.zeros((2, 3)), np.zeros((2, 1)))),
    (TypeError, "one float dtype", (np.zeros((2, 3), np.float32), np.zeros(2), np.zeros((2, 3)), np.zeros(2))),
    (TypeError, "one float dtype", (np.zeros((2, 3), int), np.zeros(2, int), np.zeros((2, 3), int),
                                    np.zeros(2, int))),
    (TypeError, "Tensor or a NumPy array", ([[0.0]], np.zeros(1), np.zeros((1, 1)), np.zeros(1))),
]


@pytest.mark.parametrize("exc, fragment, args", BAD_MERGES, ids=[str(i) for i in range(len(BAD_MERGES))])
def test_merge_refuses_mismatched_inputs(exc, fragment, args):
    with pytest.raises(exc, match=fragment):
        F.merge_attention_states(*args)


def test_merge_rows_compiles_with_numba():
    """The formula is written so the numba kernels (split-KV decoding) can call it as is."""
    import numba

    compiled = numba.njit(merge.merge_rows)
    m_a = np.array([0.0, -np.inf, -np.inf, 3.0, 2.0], dtype=np.float32)
    l_a = np.array([2.0, 0.0, 0.0, 1.0, 5.0], dtype=np.float32)
    m_b = np.array([1.0, 2.0, -np.inf, -np.inf, -1e9], dtype=np.float32)
    l_b = np.array([1.0, 1.0, 0.0, 0.0, 3.0], dtype=np.float32)
    for got, want in zip(compiled(m_a, l_a, m_b, l_b), merge.merge_rows(m_a, l_a, m_b, l_b)):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)
