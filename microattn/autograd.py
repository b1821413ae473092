"""The autograd engine: Context, Function, the graph walk, and grad mode.

A Tensor produced by ``SomeFunction.apply(...)`` remembers the ``Context`` of the call
that made it (``tensor._ctx``). When grad mode is on and an input requires grad, the
context also records the input Tensors (``ctx.parents``): those are the graph's edges.
``backward`` sorts the graph topologically and walks it from the output back to the
leaves, calling each Function's ``backward`` once, reducing broadcast gradients in one
place (``unbroadcast``) and summing the gradients of a node used more than once.
"""

import functools
import threading

import numpy as np

# ----------------------------------------------------------------------------- grad mode

_grad_mode = threading.local()  # per thread, like PyTorch; a new thread starts enabled


def is_grad_enabled():
    return getattr(_grad_mode, "enabled", True)


def _set_grad_enabled(enabled):
    _grad_mode.enabled = bool(enabled)


class no_grad:
    """Context manager (or decorator) under which Function.apply records no graph."""

    def __init__(self):
        self._previous = []  # a stack, so one instance can be entered re-entrantly

    def __enter__(self):
        self._previous.append(is_grad_enabled())
        _set_grad_enabled(False)
        return self

    def __exit__(self, *exc_info):
        _set_grad_enabled(self._previous.pop())
        return False

    def __call__(self, func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with no_grad():
                return func(*args, **kwargs)

        return wrapper


# ----------------------------------------------------------------------------- Context, Function


class Context:
    """What forward leaves for backward: saved arrays, plain attributes, and
    ``needs_input_grad`` (one bool per positional forward input)."""

    def __init__(self, needs_input_grad=()):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()
        self.function = None  # the Function subclass that made this context
        self.parents = ()  # input Tensors needing grad (None elsewhere); empty if no graph

    def save_for_backward(self, *arrays):
        self.saved_tensors = arrays


# Tensor is defined in tensor.py, which imports this module; tensor.py binds the name here
# once the class exists (``autograd.Tensor = Tensor``), so apply needs no import per call.
Tensor = None


class Function:
    """One differentiable op. Subclasses define two staticmethods on NumPy arrays:

    ``forward(ctx, *inputs, **options) -> array`` and
    ``backward(ctx, grad) -> one gradient per positional input`` (a bare array when
    there is one input, else a tuple; None for an input that needs no gradient).
    Gradients may have the broadcast (output) shape; the engine sums them back.
    """

    @staticmethod
    def forward(ctx, *inputs, **options):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        """Tensors (positional or keyword) are unwrapped to their ``.data``; anything
        else (arrays, Python numbers, ...) is passed as is and treated as a constant.
        Only positional Tensors can receive gradients.

        Two paths. With no graph to record (grad mode off, or no input requiring grad)
        the forward runs and its array is wrapped: nothing else. Otherwise the context
        also records which inputs need a gradient and the input Tensors (the graph's edges).
        """
        arrays = [arg.data if isinstance(arg, Tensor) else arg for arg in args]
        if kwargs:
            kwargs = {k: v.data if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        needs_grad = _needs_grad(args) if is_grad_enabled() else None
        ctx = Context(needs_grad or (False,) * len(args))
        ctx.function = cls
        out = Tensor(cls.forward(ctx, *arrays, **kwargs))
        out._ctx = ctx  # always attached: callers read extra results stored on ctx
        if needs_grad and out.data.dtype.kind == "f":  # e.g. no grad for indices
            out.requires_grad = True
            ctx.parents = tuple(arg if needs else None for arg, needs in zip(args, needs_grad))
        return out


def _needs_grad(args):
    """One bool per positional argument (a Tensor that requires grad), or None if none does."""
    needs = tuple(isinstance(arg, Tensor) and arg.requires_grad for arg in args)
    return needs if any(needs) else None


# ----------------------------------------------------------------------------- the graph walk


def unbroadcast(grad, shape):
    """Sum ``grad`` (broadcast shape) back down to an operand's ``shape``."""
    grad = np.asarray(grad)
    if grad.shape == tuple(shape):
        return grad
    if grad.ndim < len(shape):  # e.g. a scalar gradient for a whole tensor
        return np.broadcast_to(grad, shape)
    leading = grad.ndim - len(shape)
    if leading:
        grad = grad.sum(axis=tuple(range(leading)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return np.broadcast_to(grad, shape)  # raises if the shapes were never compatible


def _graph_parents(tensor):
    ctx = tensor._ctx
    if ctx is None:
        return ()
    return [parent for parent in ctx.parents if parent is not None]


def topological_order(root):
    """Nodes reachable from ``root``, every node after all its parents.
    Iterative depth-first search, so a graph thousands of nodes deep is fine."""
    order, visited = [], {id(root)}
    stack = [(root, iter(_graph_parents(root)))]
    while stack:
        node, unvisited = stack[-1]
        for parent in unvisited:
            if id(parent) not in visited:
                visited.add(id(parent))
                stack.append((parent, iter(_graph_parents(parent))))
                break
        else:  # all parents done
            stack.pop()
            order.append(node)
    return order


def _as_gradient_tuple(ctx, grads):
    if not isinstance(grads, tuple):
        grads = (grads,)
    if len(grads) != len(ctx.parents):
        raise RuntimeError(
            f"{ctx.function.__name__}.backward returned {len(grads)} gradient(s), "
            f"expected {len(ctx.parents)} (one per positional forward input)"
        )
    return grads


def backward(root, grad=None):
    """Accumulate d(root)/d(leaf) into ``.grad`` of every leaf that requires grad."""
    if not root.requires_grad:
        raise RuntimeError("backward() called on a tensor that does not require grad")
    if grad is None:
        if root.size != 1:
            raise RuntimeError(
                f"grad can be implicitly created only for scalar outputs; this output has "
                f"shape {root.shape}, so pass backward(grad) with that shape"
            )
        grad = np.ones(root.shape, dtype=root.dtype)
    grad = np.asarray(getattr(grad, "data", grad), dtype=root.dtype)
    if grad.shape != root.shape:
        raise ValueError(f"grad has shape {grad.shape}, expected the output's {root.shape}")

    grads = {id(root): grad}  # gradient w.r.t. each node, summed over its uses
    for node in reversed(topological_order(root)):
        node_grad = grads.pop(id(node), None)
        if node_grad is None:
            continue
        if node.is_leaf:
            if node.grad is None:
                node.grad = np.array(node_grad, dtype=node.dtype)  # a fresh copy
            else:
                node.grad += node_grad
            continue
        ctx = node._ctx
        input_grads = _as_gradient_tuple(ctx, ctx.function.backward(ctx, node_grad))
        for parent, parent_grad in zip(ctx.parents, input_grads):
            if parent is None or parent_grad is None:
                continue
            try:
                parent_grad = unbroadcast(parent_grad, parent.shape)
                parent_grad = parent_grad.astype(parent.dtype, copy=False)
            except ValueError:
                raise ValueError(
                    f"{ctx.function.__name__}.backward returned a gradient of shape "
                    f"{np.shape(parent_grad)} for an input of shape {parent.shape}"
                ) from None
            key = id(parent)
            grads[key] = grads[key] + parent_grad if key in grads else parent_grad
