"""Exercise 2: softmax's backward, ``da = p * (dy - sum(p * dy, axis))``.

The library's own is ``ops.softmax_backward``, which ``ops.Softmax.backward`` calls. Graded
against it in closed form (square rows first, so a forgotten ``keepdims`` shows as wrong
numbers rather than a broadcasting error), on several axes, with dead rows (all zero) and
near one-hot rows, then by float64 gradcheck with the learner's backward inside a softmax
``Function``.
"""

from __future__ import annotations

import types

import numpy as np

from .. import ops
from ..autograd import Function
from ..gradcheck import GradcheckError, gradcheck
from ..tensor import Tensor
from .grading import Failure, call, compare, function

NUMBER = 2
SLUG = "softmax_backward"
TITLE = "Softmax backward: p * (dy - sum(p * dy)), one number per row, no Jacobian"
FILE = "softmax_backward.py"
READ = "docs/attention-backward.md (\"Backward\", step 3) and docs/autograd.md (\"Design choices\": safe softmax)"
HINTS = [
    "Only one number per row is needed besides p and dy: delta = sum over `axis` of p * dy.",
    ("np.sum(p * dy, axis=axis, keepdims=True) keeps the summed axis as size 1, so it broadcasts "
     "back along that same axis; without keepdims it lines up with the wrong axis."),
    "Return p * (dy - delta). A dead row has p == 0 everywhere, so it gets 0 by itself: no division needed.",
]

# (shape, axis); the square one comes first (see the module docstring)
CASES = [((4, 4), -1), ((3, 5), -1), ((2, 3, 4), 1), ((5, 3), 0), ((2, 4, 3), -1)]


def solution():
    return types.SimpleNamespace(softmax_backward=ops.softmax_backward)


def softmax(a, axis):
    """The library's softmax (``ops.Softmax``) of an array."""
    return Tensor(a).softmax(axis=axis).data


def check(ns) -> list[str]:
    rng = np.random.default_rng(2)
    done = []
    for shape, axis in CASES:
        p = softmax(rng.standard_normal(shape) * 2, axis)
        dy = rng.standard_normal(shape)
        _compare_one(ns, p, dy, axis, f"shape {shape}, axis={axis}")
        done.append(f"softmax_backward, shape {shape}, axis={axis}")
    # masked rows: -inf entries get p = 0; a row that is all -inf is dead (p = 0 everywhere)
    logits = rng.standard_normal((4, 6))
    logits[1, 2:] = -np.inf
    logits[3] = -np.inf
    p = softmax(logits, -1)
    _compare_one(ns, p, rng.standard_normal(p.shape), -1, "rows with -inf logits, row 3 entirely (a dead row)")
    done.append("masked entries and a dead row (gradient 0, not NaN)")
    # near one-hot rows: large logits
    p = softmax(rng.standard_normal((3, 7)) * 300, -1)
    _compare_one(ns, p, rng.standard_normal(p.shape), -1, "large logits (near one-hot rows)")
    done.append("near one-hot rows (logits of order 300)")
    # through the engine: the library's softmax forward, your backward, against finite differences
    learner = function(ns, "softmax_backward")

    class LearnersSoftmax(Function):
        @staticmethod
        def forward(ctx, a, *, axis=-1):
            return ops.Softmax.forward(ctx, a, axis=axis)

        @staticmethod
        def backward(ctx, grad):
            (out,) = ctx.saved_tensors
            return learner(out, grad, ctx.axis)

    for shape, axis in [((3, 5), -1), ((2, 3, 4), 1)]:
        x = Tensor(rng.standard_normal(shape), requires_grad=True)
        try:
            gradcheck(lambda t, axis=axis: LearnersSoftmax.apply(t, axis=axis), [x])
        except GradcheckError as error:
            raise Failure(f"softmax with your backward fails gradcheck (shape {shape}, axis={axis}): {error}") from None
        done.append(f"gradcheck of softmax with your backward, float64, shape {shape}, axis={axis}")
    return done


def _compare_one(ns, p, dy, axis, case):
    expected = ops.softmax_backward(p, dy, axis)
    got = call(ns, "softmax_backward", p.copy(), dy.copy(), axis)
    compare(f"da ({case})", got, expected, rtol=1e-9, atol=1e-12, meaning=_mistakes(p, dy, axis))


def _mistakes(p, dy, axis):
    axis = axis % p.ndim
    row_sum = np.sum(p * dy, axis=axis)
    wrong = [
        (lambda: p * dy, ("you returned p * dy, only the diagonal of the Jacobian: subtract "
                          "delta = sum(p * dy, axis) from dy first, da = p * (dy - delta)")),
        (lambda: p * (dy - row_sum), ("you forgot keepdims=True: the row sums broadcast along the wrong "
                                      "axis, so each row subtracted another row's delta")),
        (lambda: dy - np.sum(p * dy, axis=axis, keepdims=True), "you forgot the leading factor p: da = p * (dy - delta)"),
        (lambda: p * (dy - np.sum(dy, axis=axis, keepdims=True)), "delta is sum(p * dy), not sum(dy)"),
        (lambda: -ops.softmax_backward(p, dy, axis), "the sign is flipped: da = p * (dy - delta)"),
    ]
    for other in range(p.ndim):
        if other != axis:
            wrong.append((lambda other=other: p * (dy - np.sum(p * dy, axis=other, keepdims=True)),
                          (f"you summed over axis {other}, not over `axis` ({axis}): delta sums along the axis "
                           "the softmax normalised (the one p sums to 1 over)")))
    tests = [(_matches(make), explanation) for make, explanation in wrong]
    tests.append((lambda got, expected: np.isnan(got).any(),
                  "NaN: a dead row (p == 0 everywhere) must give 0; did you divide by p or by a sum of p?"))
    tests.append((lambda got, expected: np.shape(got) != np.shape(expected), "return the shape of p"))
    return tests


def _matches(make):
    def test(got, expected):
        with np.errstate(all="ignore"):
            other = make()
        return np.shape(other) == np.shape(got) and np.allclose(got, other, rtol=1e-7, atol=1e-10)
    return test
