"""Every built-in differentiable op, one ``Function`` subclass each.

``forward`` sits directly above ``backward``; each backward comment quotes the forward
line it differentiates. Gradients may be returned in the broadcast (output) shape:
the engine's ``unbroadcast`` sums them back to each operand's shape.
Positional arguments are the differentiable inputs; options (axis, shape, mask, ...)
are keyword arguments.
"""

import numpy as np

from .autograd import Function


def _expand_reduced(grad, axis, keepdims):
    """Give a reduction's gradient back the reduced axes (as size 1) so it broadcasts."""
    if keepdims or axis is None:
        return grad  # a scalar, or already keepdims-shaped: broadcasts as is
    return np.expand_dims(grad, axis)


# ----------------------------------------------------------------------------- arithmetic


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        return a + b

    @staticmethod
    def backward(ctx, grad):
        # forward: out = a + b  ->  da = grad, db = grad
        return grad, grad


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        return a - b

    @staticmethod
    def backward(ctx, grad):
        # forward: out = a - b  ->  da = grad, db = -grad
        return grad, -grad


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # forward: out = a * b  ->  da = grad * b, db = grad * a
        da = grad * b if ctx.needs_input_grad[0] else None
        db = grad * a if ctx.needs_input_grad[1] else None
        return da, db


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # forward: out = a / b  ->  da = grad / b, db = -grad * a / b^2
        da = grad / b if ctx.needs_input_grad[0] else None
        db = -grad * a / (b * b) if ctx.needs_input_grad[1] else None
        return da, db


class Pow(Function):
    @staticmethod
    def forward(ctx, base, exponent):
        out = base**exponent
        ctx.save_for_backward(base, exponent, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        base, exponent, out = ctx.saved_tensors
        # forward: out = base ** exponent
        #   ->  dbase = grad * exponent * base ** (exponent - 1),  0 where exponent == 0
        #   ->  dexponent = grad * out * log(base),  0 where base == 0 and exponent >= 0
        # The two zeros are PyTorch's: out does not move with base when exponent == 0
        # (the formula gives 0 * 0 ** -1 = NaN at base 0), nor with exponent at base 0
        # (out == 0 there for every exponent > 0; the formula gives 0 * log(0) = NaN).
        # Other bases <= 0 keep the formula's inf / NaN, as in PyTorch, without warnings.
        dbase = dexponent = None
        with np.errstate(divide="ignore", invalid="ignore"):
            if ctx.needs_input_grad[0]:
                dbase = np.where(exponent == 0, 0.0, grad * exponent * base ** (exponent - 1))
            if ctx.needs_input_grad[1]:
                dexponent = np.where((base == 0) & (exponent >= 0), 0.0, grad * out * np.log(base))
        return dbase, dexponent


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        # forward: out = -a  ->  da = -grad
        return -grad


class MatMul(Function):
    """NumPy matmul: batched with broadcasting; a 1-D operand is a row (left) or a
    column (right) vector whose extra axis is dropped from the result."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # 1. put the axes a 1-D operand dropped back, so everything is a (..., M, N) matmul
        a2 = a[None, :] if a.ndim == 1 else a  # (K,) -> (1, K)
        b2 = b[:, None] if b.ndim == 1 else b  # (K,) -> (K, 1)
        if b.ndim == 1:
            grad = grad[..., None]  # (..., M) -> (..., M, 1)
        if a.ndim == 1:
            grad = grad[..., None, :]  # (..., N) -> (..., 1, N)
        # 2. forward: out = a @ b  ->  da = grad @ b^T, db = a^T @ grad
        da = db = None
        if ctx.needs_input_grad[0]:
            da = grad @ np.swapaxes(b2, -1, -2)
            da = da[..., 0, :] if a.ndim == 1 else da  # drop the row axis again
        if ctx.needs_input_grad[1]:
            db = np.swapaxes(a2, -1, -2) @ grad
            db = db[..., :, 0] if b.ndim == 1 else db  # drop the column axis again
        return da, db  # leading batch axes are summed away by unbroadcast


# ----------------------------------------------------------------------------- elementwise


class Exp(Function):
    @staticmethod
    def forward(ctx, a):
        out = np.exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        # forward: out = exp(a)  ->  da = grad * out
        return grad * out


class Log(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.log(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        # forward: out = log(a)  ->  da = grad / a
        return grad / a


class Sqrt(Function):
    @staticmethod
    def forward(ctx, a):
        out = np.sqrt(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        # forward: out = sqrt(a)  ->  da = grad / (2 * out)
        return grad / (2 * out)


class Abs(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.abs(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        # forward: out = |a|  ->  da = grad * sign(a)   (0 at a == 0, as in PyTorch)
        return grad * np.sign(a)


class Tanh(Function):
    @staticmethod
    def forward(ctx, a):
        out = np.tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        # forward: out = tanh(a)  ->  da = grad * (1 - out^2)
        return grad * (1 - out * out)


class Relu(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.maximum(a, 0)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        # forward: out = max(a, 0)  ->  da = grad where a > 0, else 0
        return grad * (a > 0)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, a):
        # exp of a non-positive number never overflows: pick the form per sign
        e = np.exp(-np.abs(a))
        out = np.where(a >= 0, 1 / (1 + e), e / (1 + e))
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        # forward: out = 1 / (1 + exp(-a))  ->  da = grad * out * (1 - out)
        return grad * out * (1 - out)


# ----------------------------------------------------------------------------- reductions


class Sum(Function):
    @staticmethod
    def forward(ctx, a, *, axis=None, keepdims=False):
        ctx.shape, ctx.axis, ctx.keepdims = a.shape, axis, keepdims
        return np.sum(a, axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        # forward: out = sum(a, axis)  ->  da = grad copied along the summed axes
        return np.broadcast_to(_expand_reduced(grad, ctx.axis, ctx.keepdims), ctx.shape)


class Mean(Function):
    @staticmethod
    def forward(ctx, a, *, axis=None, keepdims=False):
        out = np.mean(a, axis=axis, keepdims=keepdims)
        ctx.shape, ctx.axis, ctx.keepdims = a.shape, axis, keepdims
        ctx.count = a.size // max(np.size(out), 1)
        return out

    @staticmethod
    def backward(ctx, grad):
        # forward: out = sum(a, axis) / count  ->  da = grad / count along the axes
        grad = _expand_reduced(grad, ctx.axis, ctx.keepdims) / ctx.count
        return np.broadcast_to(grad, ctx.shape)


class Max(Function):
    """Max over ``axis``. Where several elements tie for the maximum, the gradient is
    split evenly among them (each gets grad / count), as PyTorch's ``amax`` does."""

    @staticmethod
    def forward(ctx, a, *, axis=None, keepdims=False):
        out = np.max(a, axis=axis, keepdims=True)
        if ctx.needs_input_grad[0]:
            is_max = a == out
            ties = np.sum(is_max, axis=axis, keepdims=True, dtype=a.dtype)
            ctx.share = is_max / ties  # 1/ties at each maximum, 0 elsewhere
        ctx.axis, ctx.keepdims = axis, keepdims
        return out if keepdims else np.squeeze(out, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        # forward: out = max(a, axis)  ->  da = grad * share, share = 1/ties at the max, 0 else
        return _expand_reduced(grad, ctx.axis, ctx.keepdims) * ctx.share


# ----------------------------------------------------------------------------- softmax


def _safe_row_max(a, axis):
    """Row maxima to subtract before exp; 0 for rows that are entirely -inf, so those
    rows give exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN."""
    row_max = np.max(a, axis=axis, keepdims=True)
    return np.where(row_max == -np.inf, 0, row_max)


def softmax_backward(p, grad, axis=-1):
    """The gradient reaching softmax's input, from its output ``p`` and the gradient ``grad``
    reaching ``p`` (both of one shape); ``axis`` is the softmax's axis.

    With ``delta = sum(grad * p, axis)`` (one number per row), ``da = p * (grad - delta)``:
    the Jacobian ``dp_j / da_k = p_j (δ_jk - p_k)`` applied without forming it. A dead row
    (``p == 0``) gets 0. Attention's backward is the same step (``kernels/reference.py``),
    with ``delta`` from the cheaper ``rowsum(dout * out)``.
    """
    return p * (grad - np.sum(grad * p, axis=axis, keepdims=True))


class Softmax(Function):
    """Stable softmax. A row that is entirely -inf (a fully masked attention row) gives
    all-zero probabilities and zero gradient; PyTorch gives NaN there."""

    @staticmethod
    def forward(ctx, a, *, axis=-1):
        exp = np.exp(a - _safe_row_max(a, axis))
        total = np.sum(exp, axis=axis, keepdims=True)
        out = exp / np.where(total == 0, 1, total)  # dead rows: 0 / 1 = 0
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        # forward: out = exp / sum(exp)  ->  da = out * (grad - sum(grad * out))
        # (a dead row has out == 0, so its gradient is 0)
        return softmax_backward(out, grad, axis=ctx.axis)


class LogSoftmax(Function):
    """Stable log-softmax. A row that is entirely -inf gives -inf everywhere and zero
    gradient; PyTorch gives NaN there."""

    @staticmethod
    def forward(ctx, a, *, axis=-1):
        shifted = a - _safe_row_max(a, axis)
        total = np.sum(np.exp(shifted), axis=axis, keepdims=True)
        dead_row = total == 0
        out = np.where(dead_row, -np.inf, shifted - np.log(np.where(dead_row, 1, total)))
        ctx.save_for_backward(out, dead_row)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        out, dead_row = ctx.saved_tensors
        # forward: out = shifted - log(sum(exp(shifted)))
        #   ->  da = grad - softmax * sum(grad),  softmax = exp(out)
        da = grad - np.exp(out) * np.sum(grad, axis=ctx.axis, keepdims=True)
        return np.where(dead_row, 0, da)


# ----------------------------------------------------------------------------- shape and masking


class Reshape(Function):
    @staticmethod
    def forward(ctx, a, *, shape):
        ctx.shape = a.shape
        return np.reshape(a, shape)

    @staticmethod
    def backward(ctx, grad):
        # forward: out = a.reshape(shape)  ->  da = grad.reshape(a.shape)
        return np.reshape(grad, ctx.shape)


class Transpose(Function):
    @staticmethod
    def forward(ctx, a, *, axes=None):
        ctx.axes = axes
        return np.transpose(a, axes)

    @staticmethod
    def backward(ctx, grad):
        # forward: out = a.transpose(axes)  ->  da = grad.transpose(inverse of axes)
        inverse = None if ctx.axes is None else np.argsort([ax % grad.ndim for ax in ctx.axes])
        return np.transpose(grad, inverse)


class Swapaxes(Function):
    @staticmethod
    def forward(ctx, a, *, axis1, axis2):
        ctx.axis1, ctx.axis2 = axis1, axis2
        return np.swapaxes(a, axis1, axis2)

    @staticmethod
    def backward(ctx, grad):
        # forward: out = swapaxes(a, axis1, axis2)  ->  da = swapaxes(grad, axis1, axis2)
        return np.swapaxes(grad, ctx.axis1, ctx.axis2)


class MaskedFill(Function):
    """Put ``value`` where ``mask`` (bool, broadcastable to ``a``) is True."""

    @staticmethod
    def forward(ctx, a, *, mask, value):
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"masked_fill needs a bool mask, got dtype {mask.dtype}")
        if np.broadcast_shapes(mask.shape, a.shape) != a.shape:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to {a.shape}")
        ctx.mask = mask
        return np.where(mask, np.asarray(value, dtype=a.dtype), a)

    @staticmethod
    def backward(ctx, grad):
        # forward: out = where(mask, value, a)  ->  da = where(mask, 0, grad)
        return np.where(ctx.mask, 0, grad)


class GetItem(Function):
    """``a[index]`` with basic or advanced (integer / bool array) indexing."""

    @staticmethod
    def forward(ctx, a, *, index):
        ctx.shape, ctx.dtype, ctx.index = a.shape, a.dtype, index
        return a[index]

    @staticmethod
    def backward(ctx, grad):
        # forward: out = a[index]  ->  da = zeros, then da[index] += grad
        # (np.add.at, not da[index] = grad: a repeated index must add up; basic indexing,
        # which selects each element at most once, takes the plain assignment: ~15x faster)
        da = np.zeros(ctx.shape, dtype=ctx.dtype)
        if _is_basic_index(ctx.index):
            da[ctx.index] = grad
        else:
            np.add.at(da, ctx.index, grad)
        return da


def _is_basic_index(index) -> bool:
    """Integers, slices, Ellipsis and None only (NumPy's basic indexing: no element twice)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(part is None or part is Ellipsis or isinstance(part, slice)
               or (isinstance(part, (int, np.integer)) and not isinstance(part, (bool, np.bool_)))
               for part in parts)


# ----------------------------------------------------------------------------- joining


class Concatenate(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        ctx.axis = axis
        ctx.boundaries = np.cumsum([np.shape(x)[axis] for x in arrays])[:-1]
        return np.concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        # forward: out = concatenate([a0, a1, ...], axis)  ->  dai = grad's slice i
        return tuple(np.split(grad, ctx.boundaries, axis=ctx.axis))


class Stack(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        ctx.axis = axis
        return np.stack(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        # forward: out = stack([a0, a1, ...], axis)  ->  dai = grad.take(i, axis)
        return tuple(np.moveaxis(grad, ctx.axis, 0))


class Where(Function):
    """``where(condition, a, b)``; the bool condition is a constant."""

    @staticmethod
    def forward(ctx, a, b, *, condition):
        ctx.condition = np.asarray(condition, dtype=bool)
        return np.where(ctx.condition, a, b)

    @staticmethod
    def backward(ctx, grad):
        # forward: out = where(condition, a, b)  ->  da = grad where condition, db = grad elsewhere
        da = np.where(ctx.condition, grad, 0) if ctx.needs_input_grad[0] else None
        db = np.where(ctx.condition, 0, grad) if ctx.needs_input_grad[1] else None
        return da, db
