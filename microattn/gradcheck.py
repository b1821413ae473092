"""Check an analytic gradient against central finite differences, element by element.

For outputs ``y_k = fn(*inputs)`` and fixed random cotangents ``c_k`` the check is on the
scalar ``L = sum_k <c_k, y_k>``: the engine's gradient of ``L`` (``y_k.backward(c_k)``)
must match ``(L(x + eps) - L(x - eps)) / (2 eps)`` for every element of every input that
requires grad, within ``atol + rtol * |numeric|``. A random cotangent (rather than
``sum()``) matters: the gradient of ``sum(softmax(x))`` is identically zero and a wrong
backward would pass.
"""

import numpy as np

from . import autograd
from .tensor import Tensor

# Output k's cotangent is the k-th draw of rng.standard_normal(y_k.shape),
# rng = np.random.default_rng(COTANGENT_SEED).
COTANGENT_SEED = 0


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with finite differences. Subclasses AssertionError
    so a failing check inside a test reads like a failed assert."""


def _outputs(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _objective(fn, inputs, cotangents):
    """L = sum_k <c_k, y_k> in float64, with no graph built."""
    with autograd.no_grad():
        outputs = _outputs(fn(*inputs))
    pairs = zip(outputs, cotangents)
    return sum(float(np.sum(np.asarray(y, dtype=np.float64) * c)) for y, c in pairs)


def _analytic_gradients(fn, inputs, checked, cotangents):
    previous_mode = autograd.is_grad_enabled()
    autograd._set_grad_enabled(True)  # a caller's no_grad must not hide the graph
    try:
        for i in checked:
            inputs[i].grad = None
        for y, c in zip(_outputs(fn(*inputs)), cotangents):
            if isinstance(y, Tensor) and y.requires_grad:
                y.backward(c)
    finally:
        autograd._set_grad_enabled(previous_mode)
    return {
        i: np.zeros(inputs[i].shape) if inputs[i].grad is None else inputs[i].grad.copy()
        for i in checked
    }


def _numeric_gradient(fn, inputs, tensor, cotangents, eps):
    """Central differences, perturbing a private copy of ``tensor.data`` in place."""
    original = tensor.data
    tensor.data = original.copy()
    numeric = np.zeros(original.shape)
    try:
        for index in np.ndindex(original.shape):
            tensor.data[index] = original[index] + eps
            upper = _objective(fn, inputs, cotangents)
            tensor.data[index] = original[index] - eps
            lower = _objective(fn, inputs, cotangents)
            tensor.data[index] = original[index]
            numeric[index] = (upper - lower) / (2 * eps)
    finally:
        tensor.data = original
    return numeric


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3):
    """Check ``fn``'s gradient with respect to every input that requires grad.

    ``inputs``: a sequence passed as ``fn(*inputs)``; the Tensors with ``requires_grad``
    are checked and must be float64 (TypeError otherwise: finite differences in float32
    are too coarse to mean anything). ``fn`` returns a Tensor or a tuple of Tensors; all
    outputs are checked together through ``sum_k <c_k, y_k>`` with seeded random
    cotangents (see ``COTANGENT_SEED``).

    Returns True, or raises ``GradcheckError`` naming the input, its worst element, the
    analytic and numeric values and the tolerance. The inputs' ``.grad`` (None or an
    array) and ``.data`` are left exactly as they were.
    """
    inputs = list(inputs)
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad, so there is nothing to check")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(
                f"gradcheck: input {i} has dtype {inputs[i].dtype}; gradcheck needs float64 "
                "inputs (finite differences are meaningless in lower precision)"
            )

    saved_grads = {i: inputs[i].grad for i in checked}
    try:
        with autograd.no_grad():
            shapes = [np.shape(y) for y in _outputs(fn(*inputs))]
        rng = np.random.default_rng(COTANGENT_SEED)
        cotangents = [rng.standard_normal(shape) for shape in shapes]
        analytic = _analytic_gradients(fn, inputs, checked, cotangents)
    finally:
        for i, grad in saved_grads.items():
            inputs[i].grad = grad

    for i in checked:
        numeric = _numeric_gradient(fn, inputs, inputs[i], cotangents, eps)
        tolerance = atol + rtol * np.abs(numeric)
        excess = np.abs(analytic[i] - numeric) - tolerance
        if np.all(excess <= 0):  # (NaN fails here too)
            continue
        excess = np.where(np.isnan(excess), np.inf, excess)
        worst = np.unravel_index(np.argmax(excess), numeric.shape)
        raise GradcheckError(
            f"gradcheck failed for input {i} (shape {inputs[i].shape}) at element "
            f"{tuple(int(k) for k in worst)}: analytic {analytic[i][worst]:.8g}, numeric "
            f"{numeric[worst]:.8g}, |difference| {abs(analytic[i][worst] - numeric[worst]):.3g} "
            f"exceeds tolerance {tolerance[worst]:.3g} (atol={atol} + rtol={rtol} * |numeric|)"
        )
    return True
