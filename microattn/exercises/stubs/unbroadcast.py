"""Exercise 1: sum a broadcast gradient back to an operand's shape.

    c = a + b      a: (3, 1)   b: (2, 3, 4)   c: (2, 3, 4)

Every element of ``a`` was copied to 2 * 4 places of ``c``; its gradient is the sum of ``dc``
over those places. Write ``unbroadcast`` below, then grade it:

    microattn exercise check 1 DIR        (DIR: the directory holding this file)
    microattn exercise hint 1             (if stuck)
"""

import numpy as np  # noqa: F401 - for your code


def unbroadcast(grad, shape):
    """Sum ``grad`` (the broadcast shape) back down to ``shape`` (an operand's shape).

    grad:  ndarray, e.g. (2, 3, 4)
    shape: tuple, e.g. (3, 1)
    returns an ndarray of exactly ``shape``
    """
    raise NotImplementedError  # your code here (use np.sum with axis= and keepdims=)
