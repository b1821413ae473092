"""Exercise 4: the attention backward, dV, dP, delta, dS, dQ and dK, against the reference.

The library's own steps are ``kernels/reference.py``'s ``value_grads``, ``row_delta``,
``score_grads`` and ``query_key_grads``, the lines ``reference.backward`` is made of (the
oracle every kernel is tested against). Each step is graded on its own, fed the reference's
inputs, on odd sizes (Nq != Nk), causal masks and rows that see no key; then the learner's
steps chained are compared with ``reference.backward`` and, inside an attention
``Function``, checked by float64 gradcheck.
"""

from __future__ import annotations

import types

import numpy as np

from ..autograd import Function
from ..gradcheck import GradcheckError, gradcheck
from ..kernels import reference
from ..kernels.spec import make_attention_spec
from ..tensor import Tensor
from .grading import Failure, call, compare

NUMBER = 4
SLUG = "attention_backward"
TITLE = "The attention backward: dV, dP, delta, dS, dQ and dK against the reference"
FILE = "attention_backward.py"
READ = "docs/attention-backward.md (\"Backward\" and \"Masks and empty rows\")"
HINTS = [
    ("Each step is one matrix product or one elementwise line. Transpose the last two axes with "
     "x.swapaxes(-1, -2): dv = p.swapaxes(-1, -2) @ dout, dp = dout @ v.swapaxes(-1, -2)."),
    ("delta is one number per query row: (out * dout).sum(axis=-1), shape (B, H, Nq). In score_grads "
     "give it its axis back so row i subtracts delta_i: p * (dp - delta[..., None])."),
    ("s = scale * q @ k^T, so dq = scale * ds @ k and dk = scale * ds^T @ q, with "
     "ds^T = ds.swapaxes(-1, -2): keys are the columns of ds."),
    ("Check your shapes against the docstrings: dv and dk have Nk rows (one per key), dp and ds "
     "are (Nq, Nk), dq has Nq rows."),
]

# (B, H, Nq, Nk, D, Dv, causal, scale). Square first: a transposed product then gives wrong
# numbers the grader can name, not a shape error. Then odd sizes, Nq != Nk both ways, and
# causal with rows that see no key (Nq > Nk, bottom-right aligned).
CASES = [(2, 2, 6, 6, 4, 5, True, 0.37), (1, 1, 5, 7, 3, 4, False, 0.5), (1, 2, 7, 4, 3, 2, True, 1.3)]
NAMES = ("value_grads", "row_delta", "score_grads", "query_key_grads")


def solution():
    return types.SimpleNamespace(value_grads=reference.value_grads, row_delta=reference.row_delta,
                                 score_grads=reference.score_grads, query_key_grads=reference.query_key_grads)


def make_case(rng, B, H, Nq, Nk, D, Dv, causal, scale):
    """float64 q, k, v, dout and the reference's forward: a namespace with spec, out, p, mask."""
    q, k, v = rng.standard_normal((B, H, Nq, D)), rng.standard_normal((B, H, Nk, D)), rng.standard_normal((B, H, Nk, Dv))
    dout = rng.standard_normal((B, H, Nq, Dv))
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), is_causal=causal, scale=scale)
    out, stats = reference.forward(q, k, v, spec)
    p = reference.probabilities(reference.scores(q, k, spec), stats)
    forbidden = ~np.broadcast_to(reference.allowed_pairs(spec), p.shape)
    return types.SimpleNamespace(q=q, k=k, v=v, dout=dout, spec=spec, out=out, stats=stats, p=p, scale=scale,
                                 forbidden=forbidden, label=(f"B={B} H={H} Nq={Nq} Nk={Nk} D={D} Dv={Dv}"
                                                             f"{' causal' if causal else ''} scale={scale}"))


def check(ns) -> list[str]:
    rng = np.random.default_rng(4)
    done = []
    for shape in CASES:
        c = make_case(rng, *shape)
        _check_steps(ns, c)
        done.append(f"dV, dP, delta, dS, dQ, dK one step at a time, {c.label}")
    # the steps chained, against reference.backward (rows that see no key included)
    c = make_case(rng, *CASES[-1])
    expected = reference.backward(c.q, c.k, c.v, c.out, c.stats, c.dout, c.spec)
    got = _chained(ns, c.q, c.k, c.v, c.out, c.p, c.dout, c.scale)
    for name, g, e in zip(("dQ", "dK", "dV"), got, expected):
        compare(f"{name} of your steps chained ({c.label})", g, e, rtol=1e-9, atol=1e-12)
    done.append(f"your steps chained = reference.backward, {c.label}")
    # and inside an attention Function: float64 gradcheck of q, k and v together
    learner = ns

    class LearnersAttention(Function):
        @staticmethod
        def forward(ctx, q, k, v, *, spec):
            out, stats = reference.forward(q, k, v, spec)
            ctx.save_for_backward(q, k, v, out, stats)
            ctx.spec = spec
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, stats = ctx.saved_tensors
            p = reference.probabilities(reference.scores(q, k, ctx.spec), stats)
            return _chained(learner, q, k, v, out, p, dout, ctx.spec.scale)

    for B, H, Nq, Nk, D, Dv, causal, scale in [(1, 2, 4, 5, 3, 2, True, 0.6)]:
        q, k, v = (Tensor(rng.standard_normal(s), requires_grad=True)
                   for s in [(B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv)])
        spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, is_causal=causal, scale=scale)
        try:
            gradcheck(lambda a, b, c, spec=spec: LearnersAttention.apply(a, b, c, spec=spec), [q, k, v])
        except GradcheckError as error:
            which = {"input 0": "q", "input 1": "k", "input 2": "v"}
            name = next((n for key, n in which.items() if key in str(error)), "an input")
            raise Failure(f"attention with your backward fails gradcheck for {name}: {error}") from None
        done.append(f"gradcheck of attention with your backward, float64, B={B} H={H} Nq={Nq} Nk={Nk} causal")
    return done


def _pair(got, what):
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise Failure(f"{what} should return two arrays, a tuple like (dv, dp); got {type(got).__name__}"
                      + (f" of {len(got)}" if isinstance(got, (tuple, list)) else ""))
    return got


def _chained(ns, q, k, v, out, p, dout, scale):
    dv, dp = _pair(call(ns, "value_grads", p, v, dout), "value_grads")
    delta = call(ns, "row_delta", out, dout)
    ds = call(ns, "score_grads", p, dp, delta)
    dq, dk = _pair(call(ns, "query_key_grads", ds, q, k, scale), "query_key_grads")
    return dq, dk, dv


def _check_steps(ns, c):
    T = np.swapaxes
    tol = {"rtol": 1e-9, "atol": 1e-12}
    # forward: out = p @ v
    dv, dp = reference.value_grads(c.p, c.v, c.dout)
    got_dv, got_dp = _pair(_call(ns, "value_grads", c.p.copy(), c.v.copy(), c.dout.copy()), "value_grads")
    compare(f"dV ({c.label})", got_dv, dv, **tol, meaning=[
        (_close(lambda: c.p @ c.dout), "that is P dO; dV = P^T dO: transpose P (p.swapaxes(-1, -2))"),
        (_shape_is(dv.shape[:-2] + c.p.shape[-2:-1] + dv.shape[-1:]),
         "dV has one row per key (Nk), like V: dV = P^T dO, with P transposed"),
        (_wrong_shape, "dV has the shape of V, (B, H, Nk, Dv): dV = P^T dO")])
    compare(f"dP ({c.label})", got_dp, dp, **tol, meaning=[
        (_close(lambda: T(dp, -1, -2)), "that is dP transposed: dP = dO V^T, (Nq, Nk) like P"),
        (_wrong_shape, "dP has the shape of P, (B, H, Nq, Nk): dP = dO V^T")])
    # delta = rowsum(dout * out) = rowsum(p * dp)
    delta = reference.row_delta(c.out, c.dout)
    got = call(ns, "row_delta", c.out.copy(), c.dout.copy())
    compare(f"delta ({c.label})", got, delta, **tol, meaning=[
        (_shape_is(delta.shape + (1,)), ("delta has shape (B, H, Nq): sum without keepdims (score_grads "
                                         "puts the axis back with delta[..., None])")),
        (_shape_is(c.out.shape), "you forgot to sum: delta_i = sum_d O_id dO_id, one number per query row"),
        (_shape_is(delta.shape[:-1] + c.out.shape[-1:]), ("you summed over the query rows (axis -2); sum over "
                                                          "the last axis, the Dv features of one row")),
        (_close(lambda: c.dout.sum(axis=-1)), "that is rowsum(dO); delta = rowsum(dO * O)"),
        (_close(lambda: dp.sum(axis=-1)), "that is rowsum(dP); delta = rowsum(P * dP), which is rowsum(dO * O)")])
    # forward: p = softmax(s)  ->  ds = p * (dp - delta)
    ds = reference.score_grads(c.p, dp, delta)
    got = _call(ns, "score_grads", c.p.copy(), dp.copy(), delta.copy())
    with np.errstate(all="ignore"):
        compare(f"dS ({c.label})", got, ds, **tol, meaning=[
            (lambda g, e: bool(np.any(np.asarray(g)[c.forbidden] != 0)) if np.shape(g) == e.shape else False,
             ("dS is not 0 where the mask forbids the pair: dS = P * (dP - delta), and P is 0 there, so "
              "no gradient flows through the mask. Did you forget the factor P?")),
            (_close(lambda: c.p * dp), "that is P * dP: subtract delta first, dS = P * (dP - delta)"),
            (_close(lambda: dp - delta[..., None]), "you forgot the factor P: dS = P * (dP - delta)"),
            (_close(lambda: c.p * (dp - delta[..., None, :])), ("delta_i belongs to row i: subtract "
                                                                "delta[..., None] (a column), not delta")),
            (_close(lambda: c.p * (dp - dp.sum(-1, keepdims=True))), ("delta is rowsum(P * dP) (the "
                                                                      "argument `delta`), not rowsum(dP)")),
            (_close(lambda: c.p * (dp + delta[..., None])), "the sign of delta: dS = P * (dP - delta)")])
    # forward: s = scale * q @ k^T  ->  dq = scale * ds @ k, dk = scale * ds^T @ q
    dq, dk = reference.query_key_grads(ds, c.q, c.k, c.scale)
    got_dq, got_dk = _pair(_call(ns, "query_key_grads", ds.copy(), c.q.copy(), c.k.copy(), c.scale),
                           "query_key_grads")
    scale_mistakes = [(_close(lambda: dq / c.scale), "you forgot the scale: dQ = scale * dS K"),
                      (_close(lambda: dq * c.scale), "you multiplied by the scale twice")]
    compare(f"dQ ({c.label})", got_dq, dq, **tol, meaning=scale_mistakes + [
        (_close(lambda: c.scale * T(ds, -1, -2) @ c.k), ("you transposed dS: dQ = scale * dS K (queries are "
                                                         "the rows of dS)")),
        (_wrong_shape, "dQ has the shape of Q, (B, H, Nq, D): dQ = scale * dS K")])
    compare(f"dK ({c.label})", got_dk, dk, **tol, meaning=[
        (_close(lambda: dk / c.scale), "you forgot the scale: dK = scale * dS^T Q"),
        (_close(lambda: dk * c.scale), "you multiplied by the scale twice"),
        (_close(lambda: c.scale * ds @ c.q), "dK = scale * dS^T Q: transpose dS (keys are its columns)"),
        (_wrong_shape, "dK has the shape of K, (B, H, Nk, D): dK = scale * dS^T Q, dS transposed")])


_RAISED = [
    ("could not be broadcast",
     ("delta (B, H, Nq) lines up with the last axes of dp (B, H, Nq, Nk): give it its axis back, "
      "delta[..., None], so row i subtracts delta_i")),
    ("mismatch in its core dimension",
     ("a product's inner sizes differ: one operand needs its last two axes swapped "
      "(x.swapaxes(-1, -2)); compare the shapes in the docstring")),
]


def _call(ns, name, *args):
    """``grading.call``, adding what a NumPy shape error in the learner's step usually means."""
    try:
        return call(ns, name, *args)
    except Failure as failure:
        text = str(failure)
        why = next((why for key, why in _RAISED if key in text and "not written yet" not in text), None)
        if why is None:
            raise
        raise Failure(f"{text}.\nWhat this usually means: {why}") from None


def _close(make):
    """A ``meaning`` test: ``got`` equals what ``make()`` builds (None or an error: no)."""
    def test(got, expected):
        other = make()
        return other is not None and np.shape(other) == np.shape(got) and np.allclose(got, other, rtol=1e-7, atol=1e-10)
    return test


def _shape_is(shape):
    return lambda got, expected: np.shape(got) == tuple(shape) != np.shape(expected)


def _wrong_shape(got, expected):
    return np.shape(got) != np.shape(expected)
