"""softcap and ALiBi through scaled_dot_product_attention, against oracles outside the package.

The grid (tests/grid.py, ``SCORE_TERMS``) holds every backend to the reference on these terms
beside GQA, masks, windows, dropout and empty rows; the reference and "composed" agree there
too (tests/test_functional.py). This file adds what does not go through the reference:

* **PyTorch maths**: the same attention written as plain torch tensor ops in float64
  (``torch.tanh``, the ALiBi distance matrix, ``softmax``), its gradients from torch's
  autograd, against every CPU backend and "composed";
* **finite differences** (``ma.gradcheck``, float64) through the tanh of softcap;
* **closed forms**: a worked ALiBi example, softcap's limits (a huge cap changes nothing, a
  cap bounds every score), zero slopes change nothing;
* **bad inputs** raise clear errors before any work.
"""

import numpy as np
import pytest

import microattn as ma
from microattn import functional as F

from .conftest import require

BACKENDS = ["reference", "numba", "composed"]


def inputs(B=2, Hq=4, Hkv=2, Nq=5, Nk=7, D=3, Dv=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for shape in
                     ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv), (B, Hq, Nq, Dv)))
    return q, k, v, dout


def ours(backend, q, k, v, dout, **kwargs):
    """out, dq, dk, dv through the functional API."""
    tensors = [ma.tensor(x, requires_grad=True) for x in (q, k, v)]
    out = F.scaled_dot_product_attention(*tensors, backend=backend, **kwargs)
    out.backward(dout)
    return (out.data,) + tuple(t.grad for t in tensors)


# -- PyTorch maths --------------------------------------------------------------------------

TERMS = {
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi="heads"),
    "alibi_batch+causal": dict(alibi="batch", is_causal=True),
    "softcap+alibi+causal": dict(softcap=2.0, alibi="heads", is_causal=True),
    "softcap+alibi+mask": dict(softcap=0.7, alibi="batch", mask=True),
}


def torch_attention(torch, q, k, v, scale, softcap=None, slopes=None, is_causal=False, mask=None):
    """Plain torch tensor maths: scores, tanh cap, ALiBi, masks, softmax, weighted sum."""
    Hq, Nq = q.shape[1], q.shape[2]
    Nk = k.shape[2]
    group = Hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Nq)[:, None]
    j = torch.arange(Nk)[None, :]
    if slopes is not None:
        s = s - slopes.reshape(-1, Hq)[:, :, None, None] * (i + Nk - Nq - j).abs()
    if is_causal:
        s = s.masked_fill(j > i + Nk - Nq, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TERMS))
def test_matches_torch_maths(name, backend):
    torch = require("torch")
    terms = dict(TERMS[name])
    q, k, v, dout = inputs(seed=len(name))
    rng = np.random.default_rng(7)
    kwargs = {"is_causal": terms.get("is_causal", False), "softcap": terms.get("softcap")}
    slopes = None
    if "alibi" in terms:
        slopes = rng.uniform(0.1, 0.9, (2, 4) if terms["alibi"] == "batch" else (4,))
        kwargs["alibi_slopes"] = slopes
    mask = None
    if terms.get("mask"):
        mask = rng.random((2, 1, 5, 7)) < 0.6
        mask[..., -1] = True  # (torch's softmax gives NaN on an empty row; the grid has them)
        kwargs["attn_mask"] = mask
    got = ours(backend, q, k, v, dout, **kwargs)

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = torch_attention(torch, tq, tk, tv, 1 / np.sqrt(3), softcap=kwargs["softcap"],
                          slopes=None if slopes is None else torch.tensor(slopes),
                          is_causal=kwargs["is_causal"],
                          mask=None if mask is None else torch.tensor(mask))
    out.backward(torch.tensor(dout))
    want = [out.detach().numpy()] + [t.grad.numpy() for t in (tq, tk, tv)]
    for label, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12, err_msg=label)


# -- finite differences ----------------------------------------------------------------------

GRADCHECK = {
    "softcap": dict(softcap=1.0),
    "softcap-saturated": dict(softcap=0.3),  # |s| / c up to ~10: the tanh's flat ends
    "softcap+alibi+causal": dict(softcap=2.0, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]),
                                 is_causal=True),
    "alibi_batch+window": dict(alibi_slopes=np.array([[0.3, -0.2, 0.1, 0.7], [0.2, 0.4, 0.6, 0.8]]),
                               window=(2, 1)),
    "softcap+dropout": dict(softcap=1.5, dropout_p=0.3, seed=5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck(name, backend):
    q, k, v, _ = inputs(Nq=4, Nk=6, D=3, Dv=2, seed=3)
    tensors = [ma.tensor(x, requires_grad=True) for x in (q, k, v)]
    kwargs = GRADCHECK[name]
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)  # noqa: E731
    assert ma.gradcheck(fn, tensors, atol=1e-7, rtol=1e-6)


# -- closed forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_worked_example(backend):
    """One query, three keys, all scores 0, slope ln 2: biases -2 ln 2, -ln 2, 0, so the
    weights are 1, 2, 4 over 7 (query 0 of Nq = 1 lines up with key 2 = Nk - Nq)."""
    q = np.zeros((1, 1, 1, 2))
    k = np.ones((1, 1, 3, 2))
    v = np.eye(3)[None, None]  # out = the weights
    out, lse = F.scaled_dot_product_attention(q, k, v, alibi_slopes=np.array([np.log(2.0)]),
                                              backend=backend, return_lse=True)
    np.testing.assert_allclose(out.data[0, 0, 0], np.array([1, 2, 4]) / 7, rtol=1e-14)
    np.testing.assert_allclose(lse.data[0, 0, 0], np.log(7 / 4), rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_bounds_the_scores(backend):
    """Scores of +-1e4 capped at c = 3: the row's weights are softmax(3 tanh(s / 3)), i.e.
    those of scores +-3 (no overflow, the large logits lose their dominance)."""
    q = np.array([[[[100.0]]]])
    k = np.array([[[[100.0], [-100.0], [0.0]]]])
    v = np.eye(3)[None, None]
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0, softcap=3.0, backend=backend)
    e = np.exp([3.0, -3.0, 0.0])
    np.testing.assert_allclose(out.data[0, 0, 0], e / e.sum(), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_limits_change_nothing(backend):
    """A cap far above every score is (to ~s**3 / c**2) no cap; zero slopes are no ALiBi;
    softcap=0 and None are off."""
    q, k, v, dout = inputs()
    plain = ours(backend, q, k, v, dout, is_causal=True)
    for kwargs in (dict(softcap=1e6), dict(alibi_slopes=np.zeros(4)), dict(softcap=0),
                   dict(softcap=None, alibi_slopes=None)):
        got = ours(backend, q, k, v, dout, is_causal=True, **kwargs)
        for a, e in zip(got, plain):
            np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12, err_msg=str(kwargs))


def test_slopes_are_constants():
    """alibi_slopes may be a Tensor; like flash-attention's, they get no gradient."""
    q, k, v, dout = inputs()
    slopes = ma.tensor(np.full(4, 0.5), requires_grad=True)
    out = F.scaled_dot_product_attention(ma.tensor(q, requires_grad=True), k, v,
                                         alibi_slopes=slopes, backend="numba")
    out.backward(dout)
    assert slopes.grad is None


def test_float32_stays_float32():
    q, k, v, dout = inputs(dtype=np.float32)
    for backend in BACKENDS:
        got = ours(backend, q, k, v, dout, softcap=2.0, alibi_slopes=np.full(4, 0.5))
        assert all(x.dtype == np.float32 for x in got), backend


# -- errors: clear, typed, before any work -------------------------------------------------------

Q, K, V = inputs()[:3]

BAD = [
    (ValueError, "softcap must be a finite positive number", {"softcap": -1.0}),
    (ValueError, "softcap must be a finite positive number", {"softcap": float("nan")}),
    (ValueError, "softcap must be a finite positive number", {"softcap": float("inf")}),
    (ValueError, "softcap must be a finite positive number", {"softcap": "30"}),
    (ValueError, "softcap must be a finite positive number", {"softcap": True}),
    (ValueError, "alibi_slopes must have shape", {"alibi_slopes": np.ones(3)}),
    (ValueError, "alibi_slopes must have shape", {"alibi_slopes": np.ones((3, 4))}),
    (ValueError, "alibi_slopes must have shape", {"alibi_slopes": np.ones((2, 4, 1))}),
    (TypeError, "alibi_slopes must be floating", {"alibi_slopes": np.ones(4, dtype=int)}),
    (ValueError, "alibi_slopes must be finite", {"alibi_slopes": np.array([0.5, np.nan, 0.5, 0.5])}),
    (ValueError, "alibi_slopes must be finite", {"alibi_slopes": np.array([0.5, np.inf, 0.5, 0.5])}),
    (TypeError, "alibi_slopes must be a Tensor, a NumPy array or None", {"alibi_slopes": [0.5] * 4}),
]


@pytest.mark.parametrize("exc, fragment, kwargs", BAD, ids=[str(c[2]) for c in BAD])
def test_bad_input_raises_a_clear_error(exc, fragment, kwargs, monkeypatch):
    from microattn.kernels import reference

    def boom(*args):
        raise AssertionError("a kernel ran before validation finished")

    monkeypatch.setattr(reference, "forward", boom)
    with pytest.raises(exc, match=fragment):
        F.scaled_dot_product_attention(Q, K, V, backend="reference", **kwargs)


def test_softcap_must_survive_the_dtype():
    """1e-50 is 0 in float32 (the cap would be off, silently); 1e300 is inf there."""
    q32, k32, v32 = (x.astype(np.float32) for x in (Q, K, V))
    for c in (1e-50, 1e300):
        with pytest.raises(ValueError, match="not a positive finite float32"):
            F.scaled_dot_product_attention(q32, k32, v32, softcap=c)
    F.scaled_dot_product_attention(Q, K, V, softcap=1e-50, backend="reference")  # fine in float64
