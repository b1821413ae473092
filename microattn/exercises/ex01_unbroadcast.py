"""Exercise 1: a broadcasting op's backward, ``unbroadcast``.

``c = a + b`` with ``a`` of shape (3, 1) and ``b`` of shape (2, 3, 4) copies each element of
``a`` to 2 * 4 places of ``c``. Each copy passes its share of the gradient back, so ``a``'s
gradient is ``dc`` summed over the axes broadcasting added (the leading 2) and the axes it
stretched (the trailing 4, kept as size 1). The engine calls ``unbroadcast`` for every input of
every ``Function`` (microattn/autograd.py), so ops never repeat this rule.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np

from .. import autograd
from ..gradcheck import GradcheckError, gradcheck
from ..tensor import Tensor
from .grading import Failure, call, compare, function

NUMBER = 1
SLUG = "unbroadcast"
TITLE = "A broadcasting op's backward: sum the gradient back to the operand's shape"
FILE = "unbroadcast.py"
READ = "docs/autograd.md (\"The path of one value\")"
HINTS = [
    "Broadcasting lines shapes up from the right. First sum away the axes `grad` has in front "
    "that `shape` lacks: grad.sum(axis=tuple(range(grad.ndim - len(shape)))).",
    "Then, for every axis where shape has 1 but grad does not, sum with keepdims=True: that "
    "element of the operand was copied along the whole axis.",
    "A gradient with fewer dimensions than `shape` (a scalar for a whole tensor) is broadcast "
    "out: np.broadcast_to(grad, shape). Return exactly `shape`.",
]

# (broadcast shape of the gradient, operand shape)
CASES = [((4, 5), (4, 5)), ((2, 3, 4), (3, 4)), ((2, 3, 4), (2, 1, 4)), ((5, 2, 3, 4), (3, 1)),
         ((2, 3), ()), ((7, 1, 6), (1, 1, 1)), ((), (2, 2))]


def solution():
    return types.SimpleNamespace(unbroadcast=autograd.unbroadcast)


def check(ns) -> list[str]:
    rng = np.random.default_rng(1)
    done = []
    for grad_shape, shape in CASES:
        grad = rng.standard_normal(grad_shape)
        expected = autograd.unbroadcast(grad, shape)
        got = call(ns, "unbroadcast", grad.copy(), shape)
        compare(f"unbroadcast(grad of shape {grad_shape}, {shape})", got, expected, rtol=1e-12, atol=1e-12,
                meaning=_MISTAKES(grad, shape))
        done.append(f"unbroadcast {grad_shape} -> {shape}")
    # and through the engine: a broadcasting add and multiply, against finite differences
    with _engine_using(function(ns, "unbroadcast")):
        a = Tensor(rng.standard_normal((3, 1)), requires_grad=True)
        b = Tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
        try:
            gradcheck(lambda x, y: x * y + x, (a, b))
        except GradcheckError as error:
            raise Failure(f"with your unbroadcast inside the engine, (a * b + a) fails gradcheck: {error}") from None
    done.append("gradcheck of a * b + a, a (3, 1) against b (2, 3, 4), with your unbroadcast in the engine")
    return done


def _MISTAKES(grad, shape):
    count = max(1, grad.size // max(1, int(np.prod(shape, dtype=int))))
    return [
        (lambda got, expected: np.shape(got) == tuple(s for s in shape if s != 1) != tuple(shape),
         "the size-1 axes of `shape` disappeared: sum the stretched axes with keepdims=True"),
        (lambda got, expected: np.allclose(np.asarray(got) * count, expected),
         "you averaged: each copy passes its whole gradient back, so sum"),
        (lambda got, expected: np.shape(got) != np.shape(expected),
         "return exactly `shape`: sum the leading axes away, keep the stretched ones as size 1"),
    ]


@contextlib.contextmanager
def _engine_using(unbroadcast):
    """The engine with the learner's unbroadcast in place of its own, for one check."""
    own = autograd.unbroadcast
    autograd.unbroadcast = unbroadcast
    try:
        yield
    finally:
        autograd.unbroadcast = own
