"""Exercise 2: softmax's backward, without ever forming its Jacobian.

    p  = softmax(a, axis)     a, p: any shape, e.g. (rows, n) with axis=-1; p sums to 1 along axis
    dy = dL/dp                the gradient arriving from above, the shape of p
    da = dL/da                what you return, the shape of p

The maths, for one row (the slice along ``axis``): dp_j / da_k = p_j (δ_jk - p_k), so

    da_k = sum_j dy_j p_j (δ_jk - p_k) = p_k (dy_k - delta),    delta = sum_j p_j dy_j

``delta`` is one number per row: the (n, n) Jacobian is never needed. A row that is all
zeros (softmax of a fully masked row, all -inf) must get gradient 0, not NaN.

The attention backward (exercise 4) uses the same step, ``dS = P * (dP - delta)``.
Grade your work:

    microattn exercise check 2 DIR        (DIR: the directory holding this file)
    microattn exercise hint 2             (if stuck)
"""

import numpy as np  # noqa: F401 - for your code


def softmax_backward(p, dy, axis=-1):
    """dL/da for p = softmax(a, axis), given p and dy = dL/dp.

    p:    ndarray, any shape, the softmax's output
    dy:   ndarray, the shape of p
    axis: int, the axis the softmax normalised over (may be negative)
    returns an ndarray of the shape of p
    """
    raise NotImplementedError  # your code here (np.sum with axis= and keepdims=)
