"""Exercise 3: a new differentiable op, end to end: ``Sigmoid`` as a ``Function``.

    out = sigmoid(a) = 1 / (1 + exp(-a))      a, out: any shape, float32 or float64
    d out / d a      = out * (1 - out)        so backward needs only out: save it

A ``Function`` is two staticmethods on NumPy arrays (never Tensors), forward directly
above backward:

    forward(ctx, a)      computes out and leaves what backward needs with
                         ctx.save_for_backward(...); returns an ndarray of a's shape and dtype
    backward(ctx, grad)  grad = dL/dout (the shape of out); reads ctx.saved_tensors and
                         returns dL/da, a new array (never change grad in place: the engine
                         may hand the same array to another op)

The engine does the rest: ``y = Sigmoid.apply(t)`` wraps the result in a Tensor and records
the graph, ``y.backward(g)`` calls your backward. Try it by hand:

    import microattn as ma
    t = ma.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    Sigmoid.apply(t).sum().backward(); print(t.grad)
    ma.gradcheck(Sigmoid.apply, [t])

exp(-a) overflows (to inf, with a warning) for a below about -709 in float64 and -88 in
float32; 1 / (1 + inf) is still 0, but a form that never overflows is better (the hints).
Grade your work:

    microattn exercise check 3 DIR        (DIR: the directory holding this file)
    microattn exercise hint 3             (if stuck)
"""

import numpy as np  # noqa: F401 - for your code

from microattn import Function


class Sigmoid(Function):
    """out = 1 / (1 + exp(-a)), elementwise; any shape."""

    @staticmethod
    def forward(ctx, a):
        """a: ndarray, any shape -> out, the same shape and dtype. Save what backward needs."""
        raise NotImplementedError  # your code here

    @staticmethod
    def backward(ctx, grad):
        """grad = dL/dout, the shape of out -> dL/da, the shape of a."""
        raise NotImplementedError  # your code here (quote the forward line you differentiate)
