"""scaled_dot_product_attention through every backend, on the one grid, against oracles.

Oracles: the "composed" backend (the same maths from Tensor ops, so the autograd engine
derives its backward), float64 central finite differences (``ma.gradcheck``) and closed
forms. Every backend that works here runs the same grid; "cuda" runs it in its own
process under the simulator (tests/cuda).
"""

import numpy as np
import pytest

import microattn as ma
from microattn import backends
from microattn import functional as F
from microattn.kernels.cpu import decode

from .grid import NAMES, Case, build, errors, grid, make_inputs, natural_scales

# Backends that must work on every machine (numba is a dependency, not an option).
CPU_BACKENDS = ["reference", "numba"]
GRID = grid()


def run(backend, case, dtype, seed=0) -> dict:
    """out, lse, dq, dk, dv for one case through the functional API (and dsinks, the sinks
    a Tensor that gets its gradient, for a case with sinks)."""
    q, k, v, dout, kwargs = make_inputs(case, dtype, seed)
    q, k, v = (ma.tensor(x, requires_grad=True) for x in (q, k, v))
    if case.sinks:
        kwargs["sinks"] = ma.tensor(kwargs["sinks"], requires_grad=True)
    out, lse = F.scaled_dot_product_attention(q, k, v, backend=backend, return_lse=True, **kwargs)
    out.backward(dout)
    got = dict(zip(NAMES, (out.data, lse.data, q.grad, k.grad, v.grad)))
    if case.sinks:
        got["dsinks"] = kwargs["sinks"].grad
    return got


def scales(case):
    """The natural scale of each output (the one yardstick, tests/grid.py)."""
    q, k, v, dout, spec = build(case, np.float64)
    return natural_scales(q, k, v, dout, spec)


@pytest.fixture(scope="module")
def composed64():
    """The autograd-derived oracle, computed once per case."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = run("composed", case, np.float64)
        return cache[case]

    return get


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=[c.id for c in GRID])
def test_float64_matches_composed(backend, case, composed64):
    reason = backends.unavailable_reason(backend)
    assert reason is None, reason  # a required backend missing is a failure, not a skip
    got = run(backend, case, np.float64)
    want = composed64(case)
    assert got.keys() == want.keys()
    for name in got:
        assert np.isfinite(got[name][np.isfinite(want[name])]).all(), f"{name} has non-finite values"
    err = errors(got, want, scales(case))
    assert max(err.values()) <= 1e-9, err


FLOAT32_GRID = GRID[::3]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", FLOAT32_GRID, ids=[c.id for c in FLOAT32_GRID])
def test_float32_within_float32_error(backend, case, composed64):
    """float32 results stay float32 and within 4x the error of an independent float32 oracle.

    The yardstick is the worse of the other float32 backends we always have (composed, and
    the reference when it is not the one under test) against the float64 result: at logits
    of ~1e3 the scores themselves carry float32 rounding of ~1e-4, which no float32 kernel
    avoids. A backend is never part of its own yardstick (the reference once was, which
    made its budget at least its own error: a check that could not fail). With huge finite
    masks float32 and float64 round differently (tests/grid.py): composed in float32 is the
    oracle there, within 2e-5.
    """
    got = run(backend, case, np.float32)
    for name in got:
        assert got[name].dtype == np.float32, name
    if case.masking == "huge_mask":
        err = errors(got, run("composed", case, np.float32), scales(case))
        assert max(err.values()) <= 2e-5, err
        return
    want = composed64(case)
    oracles = [errors(run(name, case, np.float32), want, scales(case))
               for name in ("composed", "reference") if name != backend]
    ours = errors(got, want, scales(case))
    for name in ours:
        budget = 4 * max(max(o[name] for o in oracles), 1e-6)
        assert ours[name] <= budget, f"{name}: {ours[name]:.3g} > {budget:.3g}"


# -- finite differences in float64 ------------------------------------------------------------

GRADCHECK_CASES = [
    Case(1, 1), Case(5, 7, 4, 2, 3, 2), Case(7, 5, 4, 1, 3, 4, masking="causal"),
    Case(6, 6, 2, 1, 3, 3, masking="window", window=(1, 0)),
    Case(5, 6, 2, 2, 2, 3, masking="causal+window", window=(2, -1)),
    Case(4, 6, 2, 1, 3, 2, masking="bool_mask"), Case(5, 4, 2, 2, 3, 3, masking="float_mask"),
    Case(6, 3, 2, 1, 2, 2, masking="empty_rows"), Case(5, 6, 4, 2, 3, 2, masking="dropout"),
    Case(4, 4, 2, 2, 3, 3, masking="large_logits"),
    # the features of tests/grid.py's FEATURES: the sinks are an input too (their gradient)
    Case(5, 6, 4, 2, 3, 2, masking="causal", sinks=True),
    Case(6, 3, 2, 1, 2, 2, masking="empty_rows", sinks=True),
    Case(6, 7, 2, 1, 3, 2, B=1, masking="causal+window", window=(1, 0), varlen=((2, 0, 1, 3), (3, 2, 0, 2))),
    Case(5, 6, 4, 2, 3, 2, masking="bool_mask", softcap=2.0, mods="prefix_relative"),
    Case(5, 5, 2, 1, 3, 2, B=1, masking="dropout", sinks=True, varlen=((2, 3), (2, 3)), mods="prefix_relative"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["composed"])
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c.id for c in GRADCHECK_CASES])
def test_gradcheck(backend, case):
    q, k, v, _, kwargs = make_inputs(case, np.float64)
    if case.masking == "large_logits":
        q = q / 300.0 * 3.0  # finite differences need a smooth neighbourhood: logits ~ 3 sqrt(D)
    inputs = [ma.tensor(x, requires_grad=True) for x in (q, k, v)]
    if case.sinks:  # the sink gradient too: (Hq,) logits, one of them -inf (no sink)
        inputs.append(ma.tensor(kwargs.pop("sinks"), requires_grad=True))

    def fn(q, k, v, *sinks):
        return F.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs,
                                              **({"sinks": sinks[0]} if sinks else {}))

    assert ma.gradcheck(fn, inputs, atol=1e-7, rtol=1e-6)


# -- closed forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["composed"])
def test_one_key_returns_its_value(backend):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 5, 4))
    k = rng.standard_normal((2, 3, 1, 4))
    v = rng.standard_normal((2, 3, 1, 6))
    out = F.scaled_dot_product_attention(q, k, v, backend=backend)
    np.testing.assert_allclose(out.data, np.broadcast_to(v, out.shape), rtol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["composed"])
def test_constant_shift_of_scores_changes_nothing(backend):
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((1, 2, 7, 4)), rng.standard_normal((1, 2, 9, 4)), rng.standard_normal((1, 2, 9, 3))
    base, lse = F.scaled_dot_product_attention(q, k, v, backend=backend, return_lse=True)
    shifted, lse2 = F.scaled_dot_product_attention(
        q, k, v, attn_mask=np.full((7, 9), 123.25), backend=backend, return_lse=True)
    np.testing.assert_allclose(shifted.data, base.data, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lse2.data, lse.data + 123.25, rtol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["composed"])
def test_scores_2_1_half_give_weight_0_6285(backend):
    # scale 1, one query q = 1, keys 2, 1, 0.5 (D = 1): scores [2, 1, 0.5];
    # values = identity rows, so the output is the weight vector itself.
    q = np.ones((1, 1, 1, 1))
    k = np.array([2.0, 1.0, 0.5]).reshape(1, 1, 3, 1)
    v = np.eye(3).reshape(1, 1, 3, 3)
    weights = F.scaled_dot_product_attention(q, k, v, scale=1.0, backend=backend).data.ravel()
    assert round(weights[0], 4) == 0.6285
    np.testing.assert_allclose(weights, np.exp([2, 1, 0.5]) / np.exp([2, 1, 0.5]).sum(), rtol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["composed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fully_masked_rows_give_zeros_minus_inf_and_zero_grad(backend, dtype):
    rng = np.random.default_rng(3)
    q, k, v = (ma.tensor(rng.standard_normal(s).astype(dtype), requires_grad=True)
               for s in ((1, 2, 4, 3), (1, 2, 5, 3), (1, 2, 5, 2)))
    mask = np.ones((4, 5), dtype=bool)
    mask[1] = False  # query 1 may see nothing
    out, lse = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, return_lse=True)
    out.backward(rng.standard_normal(out.shape).astype(dtype))
    assert np.all(out.data[:, :, 1] == 0) and np.all(lse.data[:, :, 1] == -np.inf)
    assert np.all(q.grad[:, :, 1] == 0)
    for x in (out.data, q.grad, k.grad, v.grad):
        assert np.isfinite(x).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["composed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_never_overflow(backend, dtype):
    rng = np.random.default_rng(4)
    q = ma.tensor((rng.standard_normal((1, 2, 6, 8)) * 1e4).astype(dtype), requires_grad=True)
    k, v = rng.standard_normal((1, 2, 6, 8)).astype(dtype), rng.standard_normal((1, 2, 6, 8)).astype(dtype)
    out, lse = F.scaled_dot_product_attention(q, k, v, backend=backend, return_lse=True)
    out.backward(np.ones(out.shape, dtype=dtype))
    assert np.isfinite(out.data).all() and np.isfinite(lse.data).all() and np.isfinite(q.grad).all()
    # logits ~1e4 make the softmax one-hot: out is the value of the best key
    s = np.einsum("bhid,bhjd->bhij", q.data.astype(np.float64), k.astype(np.float64))
    best = np.take_along_axis(v, s.argmax(-1)[..., None], axis=2)
    np.testing.assert_allclose(out.data, best, rtol=1e-3, atol=1e-3)


def test_causal_is_bottom_right_aligned():
    # Nq = 2, Nk = 4: query 0 sees keys 0..2, query 1 sees keys 0..3
    q, k = np.zeros((1, 1, 2, 1)), np.zeros((1, 1, 4, 1))
    v = np.arange(4.0).reshape(1, 1, 4, 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, backend="reference").data.ravel()
    np.testing.assert_allclose(out, [1.0, 1.5])  # means of 0..2 and 0..3


def test_window_worked_example():
    # Nq = Nk = 6, window (2, 0): query 4 averages keys 2, 3, 4 (equal scores)
    q, k = np.zeros((1, 1, 6, 1)), np.zeros((1, 1, 6, 1))
    v = np.arange(6.0).reshape(1, 1, 6, 1)
    for backend in CPU_BACKENDS + ["composed"]:
        out = F.scaled_dot_product_attention(q, k, v, window=(2, 0), backend=backend).data.ravel()
        np.testing.assert_allclose(out, [0, 0.5, 1, 2, 3, 4])


# -- dropout -----------------------------------------------------------------------------------


def test_dropout_same_mask_on_every_backend_and_for_a_prefix_of_queries():
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((2, 4, 9, 4)), rng.standard_normal((2, 2, 11, 4)), rng.standard_normal((2, 2, 11, 3))
    outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=0.4, seed=77, backend=b).data
            for b in CPU_BACKENDS + ["composed"]]
    for other in outs[1:]:
        np.testing.assert_allclose(other, outs[0], rtol=1e-12, atol=1e-14)
    prefix = F.scaled_dot_product_attention(q[:, :, :5], k, v, dropout_p=0.4, seed=77, backend="reference")
    np.testing.assert_allclose(prefix.data, outs[0][:, :, :5], rtol=1e-12)


def test_dropout_keeps_the_right_fraction_and_is_unbiased():
    rng = np.random.default_rng(6)
    q, k = np.zeros((1, 1, 64, 4)), rng.standard_normal((1, 1, 64, 4))
    v = np.eye(64).reshape(1, 1, 64, 64)
    # uniform weights 1/64 and one-hot values: out[i, j] is the kept mask of (i, j), rescaled,
    # so the fraction kept and the rescale 1/(1 - p) are read off separately
    outs = np.array([F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, seed=s, backend="reference").data
                     for s in range(20)])
    kept = outs != 0
    assert abs(kept.mean() - 0.75) < 0.005  # 81920 draws: the standard error is 0.0015
    np.testing.assert_allclose(outs[kept], 1 / 64 / 0.75, rtol=1e-14)
    assert abs(outs.sum(axis=-1).mean() - 1.0) < 0.007  # E[out] equals the no-dropout output
    assert not np.array_equal(kept[0], kept[1])  # seeds matter


def test_dropout_seed_none_draws_from_numpy_global_generator():
    q = np.random.default_rng(7).standard_normal((1, 1, 8, 4))
    np.random.seed(0)
    a = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend="reference").data
    np.random.seed(0)
    b = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend="reference").data
    c = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend="reference").data
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# -- API details ------------------------------------------------------------------------------


def test_arrays_are_constants_and_tensors_get_gradients():
    rng = np.random.default_rng(8)
    q = ma.tensor(rng.standard_normal((1, 2, 3, 4)), requires_grad=True)
    k = rng.standard_normal((1, 2, 3, 4))
    dout = rng.standard_normal((1, 2, 3, 4))
    out = F.scaled_dot_product_attention(q, k, k, backend="reference")
    assert isinstance(out, ma.Tensor) and out.requires_grad
    out.backward(dout)
    # the same gradient for q as when k and v are Tensors too, which get theirs
    q2, k2, v2 = (ma.tensor(x, requires_grad=True) for x in (q.data, k, k))
    F.scaled_dot_product_attention(q2, k2, v2, backend="reference").backward(dout)
    np.testing.assert_allclose(q.grad, q2.grad, rtol=1e-14)
    assert np.abs(q.grad).max() > 0 and k2.grad is not None and v2.grad is not None


def test_mask_may_be_a_tensor_and_gets_no_gradient():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 1, 3, 2))
    mask = ma.tensor(rng.standard_normal((3, 3)), requires_grad=True)
    out = F.scaled_dot_product_attention(ma.tensor(q, requires_grad=True), q, q, attn_mask=mask)
    out.backward(rng.standard_normal(out.shape))
    assert mask.grad is None
    # the Tensor mask is used, exactly as its array would be (on the same kernel: a call
    # recording no graph would run the decode kernel, which rounds differently)
    as_array = F.scaled_dot_product_attention(ma.tensor(q, requires_grad=True), q, q, attn_mask=mask.data).data
    np.testing.assert_array_equal(out.data, as_array)
    assert not np.allclose(out.data, F.scaled_dot_product_attention(q, q, q).data)


def test_no_grad_builds_no_graph():
    q = np.random.default_rng(10).standard_normal((1, 1, 3, 2))
    t = ma.tensor(q, requires_grad=True)
    with ma.no_grad():
        out = F.scaled_dot_product_attention(t, t, t)
    assert not out.requires_grad


DECODING = [case for case in GRID if case.Nq <= 16 and case.masking in (
    "causal", "window", "float_mask", "empty_rows", "dropout", "large_logits")][:12]


@pytest.mark.parametrize("case", DECODING, ids=lambda c: c.id)
def test_numba_inference_on_few_queries_runs_the_decode_kernel(case, monkeypatch):
    """Without a graph, numba hands a call of <= 16 queries to kernels/cpu/decode.py (keys
    split across threads); with one, to the tiled kernel. Both agree with the reference."""
    calls, decode_forward = [], decode.forward
    monkeypatch.setattr(decode, "forward", lambda *a, **kw: calls.append(1) or decode_forward(*a, **kw))
    q, k, v, _, kwargs = make_inputs(case, np.float64)
    want = F.scaled_dot_product_attention(q, k, v, backend="reference", **kwargs).data
    with ma.no_grad():
        got = F.scaled_dot_product_attention(ma.tensor(q, requires_grad=True), k, v, backend="numba", **kwargs)
    assert calls == [1]
    np.testing.assert_allclose(got.data, want, rtol=1e-10, atol=1e-12)
    got = F.scaled_dot_product_attention(ma.tensor(q, requires_grad=True), k, v, backend="numba", **kwargs)
    assert calls == [1]  # a graph: the tiled kernel, whose backward shares its scores' rounding
    np.testing.assert_allclose(got.data, want, rtol=1e-10, atol=1e-12)


def test_available_backends():
    names = ma.available_backends()
    assert {"reference", "composed", "numba"} <= set(names)
    assert set(names) <= set(backends.SDPA_KERNELS)


def test_auto_never_picks_the_simulator_or_something_unavailable():
    name, _ = backends.resolve("auto")
    assert name in ma.available_backends()
    if backends.unavailable_reason("numba") is None and not _real_gpu():
        assert name == "numba"


def _real_gpu():
    try:
        from numba import config, cuda
    except ImportError:
        return False
    return (not config.ENABLE_CUDASIM) and cuda.is_available()


# -- errors: clear, typed, before any work -------------------------------------------------------

Q = np.zeros((2, 4, 5, 8))
K = np.zeros((2, 2, 6, 8))
V = np.zeros((2, 2, 6, 3))

BAD_CALLS = [
    # (exception, message fragment, args, kwargs)
    (ValueError, "4-D", (Q[0], K, V), {}),
    (ValueError, "4-D", (Q, K[..., None], V), {}),
    (ValueError, "batch sizes differ", (Q, K[:1], V[:1]), {}),
    (ValueError, "same length", (Q, K, V[:, :, :5]), {}),
    (ValueError, "head dims differ", (Q, K[..., :7], V), {}),
    (ValueError, "multiple of key/value heads", (Q, np.zeros((2, 3, 6, 8)), np.zeros((2, 3, 6, 3))), {}),
    (ValueError, "same number of heads", (Q, K, np.zeros((2, 4, 6, 3))), {}),
    (ValueError, "not broadcastable", (Q, K, V), {"attn_mask": np.ones((5, 5), bool)}),
    (ValueError, "not broadcastable", (Q, K, V), {"attn_mask": np.ones((3, 1, 5, 6), bool)}),
    (TypeError, "boolean or floating", (Q, K, V), {"attn_mask": np.ones((5, 6), int)}),
    (ValueError, "NaN", (Q, K, V), {"attn_mask": np.full((5, 6), np.nan)}),
    (ValueError, "dropout_p", (Q, K, V), {"dropout_p": 1.0}),
    (ValueError, "dropout_p", (Q, K, V), {"dropout_p": -0.1}),
    (ValueError, "dropout_p", (Q, K, V), {"dropout_p": "0.1"}),
    (ValueError, "window", (Q, K, V), {"window": (3,)}),
    (ValueError, "window left", (Q, K, V), {"window": (-2, 0)}),
    (ValueError, "window right", (Q, K, V), {"window": (0, 1.5)}),
    (ValueError, "scale", (Q, K, V), {"scale": 0.0}),
    (ValueError, "scale", (Q, K, V), {"scale": float("nan")}),
    (ValueError, "seed", (Q, K, V), {"dropout_p": 0.1, "seed": -1}),
    (ValueError, "unknown backend", (Q, K, V), {"backend": "triton"}),
    (TypeError, "float32 or float64", (Q.astype(int), K, V), {}),
    (TypeError, "float32 or float64", (Q.astype(np.float16), K.astype(np.float16), V.astype(np.float16)), {}),
    (TypeError, "share one dtype", (Q.astype(np.float32), K, V), {}),
    (TypeError, "Tensor or a NumPy array", (Q.tolist(), K, V), {}),
]


@pytest.mark.parametrize("exc, fragment, args, kwargs", BAD_CALLS, ids=[c[1] for c in BAD_CALLS])
def test_bad_input_raises_a_clear_error(exc, fragment, args, kwargs):
    with pytest.raises(exc, match=fragment):
        F.scaled_dot_product_attention(*args, **kwargs)


def test_unavailable_backend_is_a_runtime_error_saying_why(monkeypatch):
    monkeypatch.setitem(backends.SDPA_KERNELS, "numba", "microattn.kernels.no_such_module")
    with pytest.raises(RuntimeError, match="not available here"):
        F.scaled_dot_product_attention(Q, K, V, backend="numba")
    if not _real_gpu():
        from numba import config
        if not config.ENABLE_CUDASIM:
            with pytest.raises(RuntimeError, match="'cuda' is not available"):
                F.scaled_dot_product_attention(Q, K, V, backend="cuda")


def test_errors_come_before_any_work(monkeypatch):
    """A bad argument is refused before a kernel runs."""
    from microattn.kernels import reference

    def boom(*args):
        raise AssertionError("a kernel ran before validation finished")

    monkeypatch.setattr(reference, "forward", boom)
    with pytest.raises(ValueError):
        F.scaled_dot_product_attention(Q, K, V, window=(1, 2, 3), backend="reference")
