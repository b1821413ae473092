"""``sinks=``: one logit per query head added to every row's softmax denominator.

Oracles: plain torch tensor maths (softmax over the scores with a sink column appended,
that column dropped before ``@ v``; autograd for every gradient, the sinks' included), the
"composed" backend (the same construction from microattn Tensor ops), float64 finite
differences, and closed forms (an empty row, a -inf sink, rows that sum to 1 - p_sink).
The CUDA backend runs the torch comparison in tests/cuda/test_lse_merge_sinks.py.
"""

import numpy as np
import pytest

import microattn as ma
from microattn import functional as F
from microattn.kernels import reference
from microattn.kernels.spec import make_attention_spec
from tests.conftest import require

BACKENDS = ["reference", "composed", "numba"]

CASES = {
    "gqa": {},
    "causal": {"is_causal": True},
    "window": {"window": (2, 1)},
    "bool_mask+empty_row": {"attn_mask": "bool"},
    "float_mask": {"attn_mask": "float"},
    "empty_rows": {"is_causal": True, "q_len": 9},  # Nq > Nk: the first 2 rows see no key
    "dropout": {"dropout_p": 0.3, "seed": 11},
}


def sink_problem(case: str, dtype=np.float64, seed=0):
    """q (2, 4, Nq, 3), k (2, 2, 7, 3), v (2, 2, 7, 5) (GQA), sinks (4,) with one -inf head,
    the sdpa keyword arguments and cotangents for out and lse."""
    kwargs = {**CASES[case]}
    Nq = kwargs.pop("q_len", 6)
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in ((2, 4, Nq, 3), (2, 2, 7, 3), (2, 2, 7, 5)))
    sinks = rng.standard_normal(4)
    sinks[2] = -np.inf  # head 2 has no sink
    if kwargs.get("attn_mask") == "bool":
        mask = rng.random((2, 1, Nq, 7)) < 0.7
        mask[1, 0, 3] = False
        kwargs["attn_mask"] = mask
    elif kwargs.get("attn_mask") == "float":
        mask = rng.standard_normal((Nq, 7))
        mask[rng.random(mask.shape) < 0.2] = -np.inf
        kwargs["attn_mask"] = mask
    g_out, g_lse = rng.standard_normal((2, 4, Nq, 5)), rng.standard_normal((2, 4, Nq))
    q, k, v, sinks, g_out, g_lse = (x.astype(dtype) for x in (q, k, v, sinks, g_out, g_lse))
    return [q, k, v, sinks], kwargs, g_out, g_lse


def ours(backend, q, k, v, sinks, kwargs, g_out, g_lse):
    """out, lse and the gradients of q, k, v, sinks for sum(out g_out) + sum(lse g_lse)."""
    leaves = [ma.tensor(x, requires_grad=True) for x in (q, k, v, sinks)]
    out, lse = F.scaled_dot_product_attention(*leaves[:3], sinks=leaves[3], return_lse=True,
                                              backend=backend, **kwargs)
    live_lse = ma.where(np.isneginf(lse.data), 0.0, lse)  # a row with no key and no sink: -inf
    ((out * g_out).sum() + (live_lse * g_lse).sum()).backward()
    return [out.data, lse.data] + [x.grad for x in leaves]


def torch_maths(torch, q, k, v, sinks, kwargs, g_out, g_lse):
    """The same in plain torch tensor maths: a sink column appended to the scores."""
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, sinks=sinks, **kwargs)
    t = [torch.tensor(x, requires_grad=True) for x in (q, k, v, sinks)]
    tq, tk, tv, tsinks = t
    group = spec.Hq // spec.Hkv
    s = tq @ tk.repeat_interleave(group, dim=1).transpose(-1, -2) * spec.scale
    if spec.has_bias:
        s = s + torch.tensor(spec.bias)
    allowed = np.broadcast_to(reference.allowed_pairs(spec), s.shape)
    s = s.masked_fill(~torch.tensor(allowed), -np.inf)
    column = tsinks.reshape(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
    s = torch.cat([s, column], dim=-1)
    # a row with no key and a -inf sink has nothing: torch's softmax would give NaN there
    dead = torch.tensor(~allowed.any(axis=-1) & np.isneginf(sinks)[None, :, None])
    s = torch.where(dead[..., None], 0.0, s)
    p = torch.softmax(s, dim=-1)[..., :-1] * ~dead[..., None]
    z = reference.dropout_multiplier(spec)
    if z is not None:
        p = p * torch.tensor(z)
    out = p @ tv.repeat_interleave(group, dim=1)
    lse = torch.logsumexp(s, dim=-1)
    loss = (out * torch.tensor(g_out)).sum() + torch.where(dead, 0.0, lse * torch.tensor(g_lse)).sum()
    loss.backward()
    lse = torch.where(dead, -np.inf, lse)
    return [out.detach().numpy(), lse.detach().numpy()] + [
        np.zeros(x.shape) if x.grad is None else x.grad.numpy() for x in t]


NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_maths(backend, case):
    torch = require("torch")
    (q, k, v, sinks), kwargs, g_out, g_lse = sink_problem(case)
    got = ours(backend, q, k, v, sinks, kwargs, g_out, g_lse)
    want = torch_maths(torch, q, k, v, sinks, kwargs, g_out, g_lse)
    for name, a, b in zip(NAMES, got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)


def test_float32_within_float32_error():
    """numba in float32 against the float64 result on the same (float32-rounded) inputs:
    within 4x the float32 reference's own error (floored at 1e-6), as tests/grid.py judges."""
    (q, k, v, sinks), kwargs, g_out, g_lse = sink_problem("causal", np.float32)
    truth = ours("reference", *(x.astype(np.float64) for x in (q, k, v, sinks)), kwargs,
                 g_out.astype(np.float64), g_lse.astype(np.float64))
    got = ours("numba", q, k, v, sinks, kwargs, g_out, g_lse)
    ref32 = ours("reference", q, k, v, sinks, kwargs, g_out, g_lse)

    def error(x, want):
        return np.abs(x.astype(np.float64) - want).max() / np.abs(want).max()

    for name, a, r, t in zip(NAMES, got, ref32, truth):
        assert a.dtype == np.float32, name
        assert error(a, t) <= 4 * max(error(r, t), 1e-6), (name, error(a, t), error(r, t))


@pytest.mark.parametrize("case", ["gqa", "bool_mask+empty_row", "dropout"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_including_the_sinks(backend, case):
    (q, k, v, sinks), kwargs, _, _ = sink_problem(case)
    sinks[2] = 0.5  # finite differences need every sink finite
    leaves = [ma.tensor(x, requires_grad=True) for x in (q, k, v, sinks)]

    def fn(q, k, v, sinks):
        return F.scaled_dot_product_attention(q, k, v, sinks=sinks, return_lse=True,
                                              backend=backend, **kwargs)

    assert ma.gradcheck(fn, leaves, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_row_with_a_sink_outputs_zero_and_lse_the_sink(backend):
    """No key allowed, a finite sink: p_sink = 1, so out 0, lse = sink, dsink = dlse."""
    rng = np.random.default_rng(5)
    q, k, v = (ma.tensor(rng.standard_normal(s), requires_grad=True)
               for s in ((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 2)))
    sinks = ma.tensor(np.array([0.25, -1.5]), requires_grad=True)
    mask = np.ones((3, 5), dtype=bool)
    mask[1] = False
    out, lse = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, sinks=sinks,
                                              return_lse=True, backend=backend)
    g_lse = np.zeros((1, 2, 3))
    g_lse[0, :, 1] = [2.0, 3.0]  # only the empty row's lse reaches the loss
    ((out * 0.0).sum() + (lse * g_lse).sum()).backward()
    assert np.all(out.data[0, :, 1] == 0)
    np.testing.assert_array_equal(lse.data[0, :, 1], [0.25, -1.5])
    np.testing.assert_allclose(sinks.grad, [2.0, 3.0], rtol=1e-15)
    assert np.all(q.grad[0, :, 1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_sum_to_one_minus_p_sink(backend):
    """With identity values, out is the row of probabilities: it sums to 1 - p_sink,
    p_sink = exp(sink - lse)."""
    rng = np.random.default_rng(6)
    q, k = rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((1, 2, 6, 3))
    v = np.broadcast_to(np.eye(6), (1, 2, 6, 6)).copy()
    sinks = np.array([1.0, -0.5])
    out, lse = F.scaled_dot_product_attention(q, k, v, sinks=sinks, return_lse=True, backend=backend)
    p_sink = np.exp(sinks[None, :, None] - lse.data)
    np.testing.assert_allclose(out.data.sum(axis=-1), 1.0 - p_sink, rtol=1e-13)
    assert (p_sink > 0.01).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_sinks_are_no_sinks(backend):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(s) for s in ((1, 2, 4, 3), (1, 2, 6, 3), (1, 2, 6, 2)))
    plain, plain_lse = F.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend)
    sinks = ma.tensor(np.full(2, -np.inf), requires_grad=True)
    qt = ma.tensor(q, requires_grad=True)
    out, lse = F.scaled_dot_product_attention(qt, k, v, sinks=sinks, return_lse=True, backend=backend)
    np.testing.assert_allclose(out.data, plain.data, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(lse.data, plain_lse.data, rtol=1e-15)
    (out.sum() + lse.sum()).backward()
    np.testing.assert_array_equal(sinks.grad, [0.0, 0.0])


def test_a_decoding_step_with_sinks_matches_the_reference():
    """The decode kernel's backward recomputes its statistics: the sinks are folded there too."""
    from microattn.kernels.cpu import decode

    (q, k, v, sinks), _, g_out, _ = sink_problem("gqa")
    q = q[:, :, :2]
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, sinks=sinks, is_causal=True)
    results = []
    for kernel in (decode, reference):
        leaves = [ma.tensor(x, requires_grad=True) for x in (q, k, v, sinks)]
        out = F.Attention.apply(*leaves, spec=spec, kernel=kernel)
        out.backward(g_out[:, :, :2])
        results.append([out.data] + [x.grad for x in leaves])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


Q, K, V = np.zeros((1, 4, 3, 2)), np.zeros((1, 2, 5, 2)), np.zeros((1, 2, 5, 2))
BAD_SINKS = [
    (ValueError, r"shape \(Hq,\) = \(4,\)", np.zeros(2)),
    (ValueError, r"shape \(Hq,\) = \(4,\)", np.zeros((1, 4))),
    (TypeError, "dtype of query", np.zeros(4, np.float32)),
    (TypeError, "dtype of query", np.zeros(4, int)),
    (ValueError, "NaN or \\+inf", np.array([0.0, np.nan, 0.0, 0.0])),
    (ValueError, "NaN or \\+inf", np.array([0.0, np.inf, 0.0, 0.0])),
    (TypeError, "sinks must be a Tensor", [0.0, 0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("exc, fragment, sinks", BAD_SINKS, ids=[str(i) for i in range(len(BAD_SINKS))])
def test_bad_sinks_are_refused_before_any_work(exc, fragment, sinks):
    with pytest.raises(exc, match=fragment):
        F.scaled_dot_product_attention(Q, K, V, sinks=sinks, backend="reference")
