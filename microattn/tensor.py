"""Tensor: a NumPy array plus what autograd needs (``grad``, ``requires_grad``, ``_ctx``).

Every differentiable method is a thin call into one ``Function`` from ``ops.py``.
Python scalars are passed to the ops as Python numbers, so NumPy 2's weak-scalar rules
apply: ``float32_tensor * 2.0`` stays float32. NumPy arrays are constants.
"""

import numpy as np

from . import autograd, ops


def _is_floating(dtype):
    return np.issubdtype(dtype, np.floating)


class Tensor:
    # NumPy defers to Tensor's reflected operators: ndarray + Tensor -> Tensor.__radd__
    __array_ufunc__ = None

    def __init__(self, data, requires_grad=False):
        """Wrap ``data`` without copying (use ``microattn.tensor`` for a copy)."""
        self.data = np.asarray(data.data if isinstance(data, Tensor) else data)
        self.grad = None
        self._requires_grad = False
        if requires_grad:
            self.requires_grad = True  # the setter checks the dtype
        self._ctx = None  # the autograd.Context of the op that made this tensor

    # ------------------------------------------------------------------ attributes

    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value):
        if value and not _is_floating(self.data.dtype):
            raise TypeError(
                "only floating-point tensors can require grad, "
                f"this one has dtype {self.data.dtype}"
            )
        self._requires_grad = bool(value)

    @property
    def is_leaf(self):
        """True unless an op recorded this tensor's inputs in the graph."""
        return self._ctx is None or not self._ctx.parents

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    T = property(lambda self: self.transpose())

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self):
        body = np.array2string(self.data, prefix="tensor(", separator=", ")
        extras = "" if self.data.dtype in (np.float64, np.int64) else f", dtype={self.dtype}"
        if self.requires_grad:
            extras += ", requires_grad=True"
        return f"tensor({body}{extras})"

    # ------------------------------------------------------------------ autograd and NumPy

    def backward(self, grad=None):
        """Accumulate gradients into the ``.grad`` of every leaf this tensor depends on.
        ``grad`` (the output's cotangent) may be omitted only for a one-element tensor."""
        autograd.backward(self, grad)

    def detach(self):
        """A tensor sharing this one's data, outside any graph."""
        return Tensor(self.data)

    def numpy(self):
        return self.data

    def item(self):
        return self.data.item()

    def __bool__(self):
        return bool(self.data)  # NumPy's rule: only one-element tensors have a truth value

    def __float__(self):
        return float(self.data)

    def __int__(self):
        return int(self.data)

    def __array__(self, dtype=None, copy=None):
        if copy:
            return np.array(self.data, dtype=dtype, copy=True)
        if dtype is not None and dtype != self.data.dtype:
            if copy is False:
                raise ValueError(f"cannot convert {self.dtype} to {dtype} without a copy")
            return self.data.astype(dtype)
        return self.data

    # ------------------------------------------------------------------ operators

    def __add__(self, other):
        return ops.Add.apply(self, other)

    def __radd__(self, other):
        return ops.Add.apply(other, self)

    def __sub__(self, other):
        return ops.Sub.apply(self, other)

    def __rsub__(self, other):
        return ops.Sub.apply(other, self)

    def __mul__(self, other):
        return ops.Mul.apply(self, other)

    def __rmul__(self, other):
        return ops.Mul.apply(other, self)

    def __truediv__(self, other):
        return ops.Div.apply(self, other)

    def __rtruediv__(self, other):
        return ops.Div.apply(other, self)

    def __pow__(self, exponent):
        return ops.Pow.apply(self, exponent)

    def __rpow__(self, base):
        return ops.Pow.apply(base, self)

    def __matmul__(self, other):
        return ops.MatMul.apply(self, other)

    def __rmatmul__(self, other):
        return ops.MatMul.apply(other, self)

    def __neg__(self):
        return ops.Neg.apply(self)

    # Comparisons give plain bool arrays (no graph). ``==`` and ``!=`` are left as
    # identity so tensors stay hashable and ``tensor in list`` works.
    def __lt__(self, other):
        return self.data < _data(other)

    def __le__(self, other):
        return self.data <= _data(other)

    def __gt__(self, other):
        return self.data > _data(other)

    def __ge__(self, other):
        return self.data >= _data(other)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            index = tuple(_data(i) for i in index)
        return ops.GetItem.apply(self, index=_data(index))

    # ------------------------------------------------------------------ elementwise

    def exp(self):
        return ops.Exp.apply(self)

    def log(self):
        return ops.Log.apply(self)

    def sqrt(self):
        return ops.Sqrt.apply(self)

    def abs(self):
        return ops.Abs.apply(self)

    def tanh(self):
        return ops.Tanh.apply(self)

    def relu(self):
        return ops.Relu.apply(self)

    def sigmoid(self):
        return ops.Sigmoid.apply(self)

    # ------------------------------------------------------------------ reductions

    def sum(self, axis=None, keepdims=False):
        return ops.Sum.apply(self, axis=_axis(axis), keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return ops.Mean.apply(self, axis=_axis(axis), keepdims=keepdims)

    def max(self, axis=None, keepdims=False):
        """Ties for the maximum share the gradient evenly (PyTorch's ``amax`` rule)."""
        return ops.Max.apply(self, axis=_axis(axis), keepdims=keepdims)

    def softmax(self, axis=-1):
        """Stable; a row that is entirely -inf gives zeros (not NaN) and zero gradient."""
        return ops.Softmax.apply(self, axis=axis)

    def log_softmax(self, axis=-1):
        """Stable; a row that is entirely -inf gives -inf (not NaN) and zero gradient."""
        return ops.LogSoftmax.apply(self, axis=axis)

    # ------------------------------------------------------------------ shape

    def reshape(self, *shape):
        """``t.reshape(2, 3)`` or ``t.reshape((2, 3))``; one entry may be -1."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = tuple(shape[0])
        return ops.Reshape.apply(self, shape=shape)

    def transpose(self, *axes):
        """NumPy's meaning: no axes reverses them; ``t.transpose(0, 2, 1)`` or a tuple."""
        if len(axes) == 1 and not isinstance(axes[0], (int, np.integer)):
            axes = axes[0]
        return ops.Transpose.apply(self, axes=tuple(axes) if axes else None)

    def swapaxes(self, axis1, axis2):
        return ops.Swapaxes.apply(self, axis1=axis1, axis2=axis2)

    def masked_fill(self, mask, value):
        """Put ``value`` where the bool ``mask`` (broadcastable to this shape) is True;
        those positions get zero gradient."""
        return ops.MaskedFill.apply(self, mask=mask, value=value)


autograd.Tensor = Tensor  # the engine wraps every Function output in this class


# ----------------------------------------------------------------------------- helpers


def _data(x):
    return x.data if isinstance(x, Tensor) else x


def _axis(axis):
    return tuple(axis) if isinstance(axis, list) else axis


def tensor(data, requires_grad=False, dtype=None):
    """A new Tensor holding a copy of ``data``. float32 and float64 are kept as they are,
    Python floats become float64 and integers stay integers (NumPy's rules)."""
    array = np.array(_data(data), dtype=dtype, copy=True)
    if requires_grad and not _is_floating(array.dtype):
        raise TypeError(
            f"only floating-point tensors can require grad, got dtype {array.dtype}; "
            "pass dtype=np.float64 (or float32) to convert"
        )
    return Tensor(array, requires_grad=requires_grad)


def concatenate(tensors, axis=0):
    """Join tensors (or arrays, as constants) along an existing axis."""
    return ops.Concatenate.apply(*tensors, axis=axis)


def stack(tensors, axis=0):
    """Join tensors (or arrays, as constants) along a new axis."""
    return ops.Stack.apply(*tensors, axis=axis)


def where(condition, a, b):
    """``a`` where the bool ``condition`` is True, else ``b``; no gradient into condition."""
    return ops.Where.apply(a, b, condition=_data(condition))
