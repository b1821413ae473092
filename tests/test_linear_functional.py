"""linear_attention through the functional API: backends agree, gradients, errors.

The kernels themselves are checked against a dense O(N^2) formula in
tests/kernels/test_linear.py; here the autograd wiring and validation are.
"""

import numpy as np
import pytest

import microattn as ma
from microattn import backends
from microattn import functional as F

from .grid import rel_err

LINEAR_BACKENDS = ["reference", "numba"]


def inputs(B=2, Hq=4, Hkv=2, Nq=9, Nk=11, D=3, Dv=5, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv))
    return [ma.tensor(rng.standard_normal(s).astype(dtype), requires_grad=True) for s in shapes]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq, Nk", [(9, 11), (11, 9), (1, 7), (37, 37)])
def test_backends_agree_through_autograd(causal, Nq, Nk):
    results = []
    for backend in LINEAR_BACKENDS:
        assert backends.unavailable_reason(backend, "linear_attention") is None
        q, k, v = inputs(Nq=Nq, Nk=Nk)
        out = F.linear_attention(q, k, v, causal=causal, backend=backend)
        out.backward(np.random.default_rng(1).standard_normal(out.shape))
        results.append((out.data, q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-9


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(backend, causal):
    q, k, v = inputs(B=1, Hq=2, Hkv=1, Nq=5, Nk=4, D=3, Dv=2)
    fn = lambda q, k, v: F.linear_attention(q, k, v, causal=causal, backend=backend)  # noqa: E731
    assert ma.gradcheck(fn, [q, k, v], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
def test_float32_stays_float32(backend):
    q, k, v = inputs(dtype=np.float32)
    out = F.linear_attention(q, k, v, causal=True, backend=backend)
    out.sum().backward()
    assert out.dtype == np.float32 and q.grad.dtype == np.float32


def test_queries_with_no_key_give_zeros_and_zero_grad():
    q, k, v = inputs(Nq=6, Nk=3)  # causal: queries 0..2 see no key
    out = F.linear_attention(q, k, v, causal=True)
    out.backward(np.ones(out.shape))
    assert np.all(out.data[:, :, :3] == 0) and np.all(q.grad[:, :, :3] == 0)
    assert np.isfinite(k.grad).all() and np.isfinite(v.grad).all()


@pytest.mark.parametrize("kwargs, exc, fragment", [
    ({"causal": "yes"}, ValueError, "causal"),
    ({"eps": 0.0}, ValueError, "eps"),
    ({"feature_map": "relu"}, ValueError, "feature_map"),
    ({"backend": "composed"}, ValueError, "unknown backend"),
])
def test_bad_arguments(kwargs, exc, fragment):
    q, k, v = inputs()
    with pytest.raises(exc, match=fragment):
        F.linear_attention(q, k, v, **kwargs)


def test_bad_shapes_and_dtypes():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        F.linear_attention(q, k.data[:, :1].repeat(3, axis=1), v.data[:, :1].repeat(3, axis=1))
    with pytest.raises(TypeError, match="share one dtype"):
        F.linear_attention(q, k.data.astype(np.float32), v)
