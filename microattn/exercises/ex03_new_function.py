"""Exercise 3: a new ``Function`` end to end, ``Sigmoid``: forward, ctx.save_for_backward, backward.

The library's own is ``ops.Sigmoid`` (``Tensor.sigmoid``). Graded on its values (float64,
float32 keeping its dtype, logits of order 700 that overflow a careless exp to NaN), on
what forward saves, on the gradient through the engine against the library's, and by
float64 gradcheck on inputs that are not plain contiguous arrays: a transposed strided view,
a broadcast (stride 0, read-only) array, and one gradient array handed to two uses at once.
"""

from __future__ import annotations

import types
import warnings

import numpy as np

from .. import ops
from ..autograd import Context, Function
from ..gradcheck import GradcheckError, gradcheck
from ..tensor import Tensor
from .grading import Failure, call, compare, function

NUMBER = 3
SLUG = "new_function"
TITLE = "A new Function end to end: Sigmoid's forward, save_for_backward and backward"
FILE = "sigmoid_function.py"
READ = "docs/autograd.md (\"Writing your own Function\")"
HINTS = [
    ("forward: out = 1 / (1 + np.exp(-a)); ctx.save_for_backward(out); return out. backward: "
     "(out,) = ctx.saved_tensors, then the chain rule: dL/da = grad * dout/da."),
    "dout/da = out * (1 - out), so backward returns grad * out * (1 - out): a new array, the shape of grad.",
    ("No overflow: for a >= 0 use 1 / (1 + exp(-a)), for a < 0 the same value as exp(a) / (1 + exp(a)). "
     "e = np.exp(-np.abs(a)) never overflows; np.where(a >= 0, 1 / (1 + e), e / (1 + e))."),
    "forward and backward get and return NumPy arrays; Sigmoid.apply(tensor) is how you call it.",
]


def solution():
    return types.SimpleNamespace(Sigmoid=ops.Sigmoid)


def check(ns) -> list[str]:
    cls = function(ns, "Sigmoid")
    if not (isinstance(cls, type) and issubclass(cls, Function)):
        raise Failure("`Sigmoid` must be a class that subclasses microattn.Function (class Sigmoid(Function): ...)")
    rng = np.random.default_rng(3)
    steps = types.SimpleNamespace(**{"Sigmoid.forward": cls.forward, "Sigmoid.apply": cls.apply,
                                     "Sigmoid.backward": lambda run, *args: run(*args)})
    done = []

    # forward on arrays: an ndarray of a's shape and dtype, something saved for backward
    for a in [rng.standard_normal((3, 4)) * 3, (rng.standard_normal(7) * 3).astype(np.float32),
              np.array([-745.0, -700.0, -40.0, 0.0, 40.0, 700.0, 745.0])]:
        ctx = Context((True,))
        with warnings.catch_warnings(), np.errstate(over="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            got = call(steps, "Sigmoid.forward", ctx, a.copy())
        what = f"Sigmoid.forward of {a.dtype} {a.shape}" + (" (logits up to 745)" if np.abs(a).max() > 100 else "")
        if isinstance(got, Tensor):
            raise Failure(f"{what} returned a Tensor: forward works on NumPy arrays and returns one "
                          "(apply wraps it); use np.exp, not Tensor methods")
        expected = ops.Sigmoid.forward(Context((True,)), a)
        compare(what, got, expected, rtol=1e-6 if a.dtype == np.float32 else 1e-12, atol=1e-300,
                meaning=_forward_mistakes(a))
        if np.asarray(got).dtype != a.dtype:
            raise Failure(f"{what} returned {np.asarray(got).dtype}: keep the input's dtype "
                          "(a float64 constant such as np.float64(1) promotes float32)")
        if not ctx.saved_tensors:
            raise Failure("Sigmoid.forward saved nothing: leave what backward needs with "
                          "ctx.save_for_backward(out) (or the input a), and read it in backward as "
                          "(out,) = ctx.saved_tensors")
        done.append(what)

    # backward through the engine, against the library's gradient
    a = rng.standard_normal((4, 5)) * 2
    g = rng.standard_normal(a.shape)
    expected = _library_gradient(a, g)
    x = Tensor(a.copy(), requires_grad=True)
    arriving = g.copy()
    call(steps, "Sigmoid.backward", lambda: call(steps, "Sigmoid.apply", x).backward(arriving))
    if not np.array_equal(arriving, g):
        raise Failure("Sigmoid.backward changed `grad` in place (grad *= ...): the engine may hand that same "
                      "array to other ops, and the caller's array changed. Return a new array: grad * out * (1 - out)")
    compare("dL/da from your backward (a (4, 5))", x.grad, expected, rtol=1e-10, atol=1e-12,
            meaning=_backward_mistakes(a, g))
    done.append("backward through the engine, against ops.Sigmoid's gradient")

    # gradcheck, float64, on inputs that are not plain contiguous arrays
    big = rng.standard_normal((6, 8))
    cases = [
        ("a (3, 5)", lambda t: cls.apply(t), rng.standard_normal((3, 5))),
        ("a transposed strided view (4, 3) of a (6, 8) array", lambda t: cls.apply(t), big[::2, ::2].T),
        ("a broadcast input (stride 0, read-only) of shape (3, 4)", lambda t: cls.apply(t),
         np.broadcast_to(rng.standard_normal(4), (3, 4))),
        ("sigmoid(a) + sigmoid(a) (the engine hands one grad array to both)",
         lambda t: cls.apply(t) + cls.apply(t), rng.standard_normal((2, 3))),
    ]
    for what, fn, data in cases:
        error = call(steps, "Sigmoid.backward", _gradcheck_error, fn, Tensor(data, requires_grad=True))
        if error is not None:
            raise Failure(f"gradcheck fails for {what}: {error}" + _gradcheck_hint(what))
        done.append(f"gradcheck, float64, {what}")
    return done


def _gradcheck_error(fn, t):
    """The GradcheckError of ``fn`` at ``t`` (None: it passes); the learner's own errors propagate."""
    try:
        gradcheck(fn, [t])
    except GradcheckError as error:
        return error
    return None


def _library_gradient(a, g):
    x = Tensor(a.copy(), requires_grad=True)
    ops.Sigmoid.apply(x).backward(g)
    return x.grad


def _forward_mistakes(a):
    with np.errstate(all="ignore"):
        flipped = 1 / (1 + np.exp(a))
    return [
        (lambda got, expected: np.isnan(got).any(),
         ("NaN for large |a|: exp overflowed to inf and inf / inf is NaN. Pick the form per sign so exp "
          "only ever sees -|a| (hint 3)")),
        (lambda got, expected: np.allclose(got, flipped, rtol=1e-6), "that is sigmoid(-a): the sign in exp(-a) slipped"),
        (lambda got, expected: np.shape(got) != np.shape(expected), "return an array of a's shape"),
    ]


def _backward_mistakes(a, g):
    out = ops.Sigmoid.forward(Context((True,)), a)
    wrong = [
        (g * out, "that is grad * out: dsigmoid/da is out * (1 - out)"),
        (out * (1 - out), "you forgot to multiply by grad, the gradient arriving from above (chain rule)"),
        (g * a * (1 - a), "you used the input a where the formula wants out = sigmoid(a): out * (1 - out)"),
        (g * (1 - out), "that is grad * (1 - out): dsigmoid/da is out * (1 - out)"),
        (g, "you passed grad through unchanged: multiply by out * (1 - out)"),
    ]
    return [(lambda got, expected, w=w: np.allclose(got, w, rtol=1e-7, atol=1e-12), why) for w, why in wrong]


def _gradcheck_hint(what):
    if "sigmoid(a) + sigmoid(a)" in what:
        return ("\nWhat this usually means: backward changed `grad` in place (grad *= ...): the engine "
                "handed that same array to the other sigmoid too. Return a new array: grad * out * (1 - out)")
    return ""
