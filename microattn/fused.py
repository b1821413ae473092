"""Fused Functions: one op, one pass over memory, a hand-written backward.

A LayerNorm built from Tensor ops (``nn.layers.layer_norm_composed``) is eleven graph
nodes, eleven NumPy temporaries and eleven single-threaded passes over the activations;
here it is one ``Function`` whose forward and backward are each one numba loop over rows
(on two threads for large inputs only: see ``SPLIT_WORK`` and ``PARALLEL_WORK``). The Tensor-op versions stay in ``nn/layers.py`` as the teaching
twins and as the oracles the tests compare against (tests/test_fused.py), besides float64
gradchecks.

Each forward sits directly above its backward; the backward quotes the forward line it
differentiates. Shape legend: ``x`` (..., E) is viewed as ``rows`` (M, E), M the product
of the leading axes; elementwise ops see their inputs flat.

Where the work is a matrix product (``Linear``) it stays in NumPy: one BLAS call per
product, forward and backward, on views rather than copies. Everything else is a numba
loop nest compiled twice (``kernel`` below: a parallel ``prange`` over blocks for large
inputs, the same loops on the calling thread for small ones; the flags of
``kernels/cpu/_compile``, fastmath without ``nnan``/``ninf``, cached), with the float32
exp of the flash kernels (``fast_exp``, a polynomial the compiler vectorises) for the
sigmoid, the GELU and the cross-entropy.

Compiled code follows two rules. numba types a Python float literal as float64 and would
silently compute a float32 kernel in float64 (scalar libm ``exp``, half the SIMD lanes),
so every constant is cast to the array's type first (``t = x.dtype.type``, then
``t(0.5)``). And the loops hold no array expressions: each compiles to a function of its
own and multiplies compile time.

Parameter gradients (LayerNorm's weight, an embedding table) are sums over rows: each of
``CHUNKS`` fixed row ranges adds into its own partial row, and the partials are summed in
order afterwards. The split does not depend on the thread count, so results are
bit-identical from run to run and machine to machine.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import types

import numpy as np

from .autograd import Function
from .kernels import blas
from .kernels.cpu._compile import FASTMATH, PARALLEL, fast_exp, numba, prange
from .losses import apply_cross_entropy, reduce_losses

# Elements below which a kernel runs on the calling thread. These loops move memory more
# than they compute, and on this 2-core machine one core already takes what the memory
# gives: measured serial against parallel, SiLU forward 0.18 vs 0.23 ms at 2048 x 256 and
# 0.70 vs 0.74 ms at 2048 x 1024, LayerNorm 0.16 vs 0.18 and 0.66 vs 0.72 ms. Waking the
# workers costs 10-70 us besides. So both cores only from 4M elements on.
PARALLEL_WORK = 1 << 22
# Elements from which a kernel with independent rows runs on two threads without a
# parallel region (``kernel``, ``_two_threads``): the product helper thread costs ~15 us
# to hand a task to when it is awake, ~60 us when it sleeps. Measured forward+backward,
# alternating in one process: at 2048 x 1024 SiLU 2.59 -> 2.12 ms, SwiGLU 3.80 -> 3.21,
# LayerNorm 2.49 -> 2.30, cross-entropy 2.53 -> 2.41; at 2048 x 256 all slower (SiLU
# 0.64 -> 0.72 ms).
SPLIT_WORK = 1 << 20
SPLIT_PARTS = 8


class kernel:
    """A loop nest compiled twice with ``kernels/cpu/_compile``'s flags: ``parallel``
    (``prange`` split over the cores) and ``serial`` (``prange`` is ``range``).
    ``kernel(*args, work=n)`` runs the parallel one from ``PARALLEL_WORK`` elements on.

    Below that, a kernel whose work is independent rows (or elements) of some arguments,
    ``split`` = their positions, runs on two threads from ``SPLIT_WORK`` on: those
    arguments are cut along their first axis into ``SPLIT_PARTS`` pieces (at multiples
    of ``align``), and this thread and the product helper thread take pieces in turn,
    each a call of the serial twin on views (``_two_threads``). Every row is computed by
    the same code whichever thread takes it; flat kernels cut at multiples of ``BLOCK``,
    so even their vector loops' remainders fall where the serial run's do: bit-identical.

    NumPy's error model: a division is a division, not a branch that raises
    ZeroDivisionError, which stops LLVM vectorising the loop (measured: the SiLU loop ran
    4x slower with the branch).
    """

    def __init__(self, fn, split=None, align=1):
        options = {"cache": True, "fastmath": FASTMATH, "nogil": True, "error_model": "numpy"}
        self.parallel = numba.njit(parallel=PARALLEL, **options)(fn)
        serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)
        serial.__qualname__ = fn.__qualname__ + "_serial"  # its own numba cache file
        self.serial = numba.njit(**options)(serial)
        self.split, self.align = split, align

    def __call__(self, *args, work):
        if work >= PARALLEL_WORK:
            return self.parallel(*args)
        if self.split is not None and work >= SPLIT_WORK:
            return _two_threads(self.serial, args, self.split, self.align)
        return self.serial(*args)


def split_kernel(*split, align=1):
    """``@split_kernel(0, 2)``: a ``kernel`` whose arguments 0 and 2 are cut into rows."""
    return lambda fn: kernel(fn, split, align)


def _two_threads(fn, args, split, align):
    """fn(*args) as pieces fn(*views) along the first axis of args[i], i in split, taken
    in turn by this thread and the product helper thread (numba releases the GIL inside
    each). If the helper has not started by the time this thread has taken every piece,
    its task is cancelled: nobody waits for a thread that is not there."""
    n = args[split[0]].shape[0]
    units = -(-n // align)
    parts = min(SPLIT_PARTS, units)
    bounds = [min(n, units * part // parts * align) for part in range(parts + 1)]
    pieces = itertools.count()  # next() is atomic under the GIL: each piece is taken once

    def take():
        while (piece := next(pieces)) < parts:
            lo, hi = bounds[piece], bounds[piece + 1]
            fn(*(arg[lo:hi] if i in split else arg for i, arg in enumerate(args)))

    helper = _product_helper.submit(take)
    take()
    if not helper.cancel():
        helper.result()


CHUNKS = 16  # row ranges for parameter-gradient partial sums (see the module docstring)
BLOCK = 8192  # elements per task of the elementwise kernels
GELU_C = math.sqrt(2.0 / math.pi)  # gelu(x) = 0.5 x (1 + tanh(GELU_C (x + GELU_A x^3)))
GELU_A = 0.044715
EXP_LIMIT = 80.0  # exp arguments are clipped here: exp(80) is finite in float32


def _rows(x):
    """x (..., E) as contiguous rows (M, E): a view when x is contiguous already."""
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


def _flat(x):
    return np.ascontiguousarray(x).reshape(-1)


def _check_vectors(name, x, **vectors):
    """ValueError unless each of ``vectors`` is (E,), E x's last axis: the norms' kernels
    read weight[j] and bias[j] for every j < E without bounds checks."""
    E = np.shape(x)[-1] if np.ndim(x) else None
    for what, vector in vectors.items():
        if E is None or np.shape(vector) != (E,):
            raise ValueError(f"{name} over x of shape {np.shape(x)} needs {what} of shape ({E},), "
                             f"got shape {np.shape(vector)}")


# ----------------------------------------------------------------------------- Linear

FEW_ROWS = 16  # up to this many rows (decoding), a product is a matrix-vector product per row
THREADED_PRODUCT = 1 << 25  # multiply-adds; smaller products run whole on one thread
PRODUCT_PARTS = 4  # at most this many blocks a large product is cut into, for two threads
MIN_PART = 128  # rows (or columns) of the output per block, at least
_product_helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="microattn-product")


def _new_product_helper_after_fork():
    """A forked child has no helper thread, yet the parent's executor, its thread started
    and idle, would start none and queue every task: ``_split_product``, which waits for
    its task, hung. The child gets an executor of its own."""
    global _product_helper
    _product_helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="microattn-product")


os.register_at_fork(after_in_child=_new_product_helper_after_fork)


def _product(a, b):
    """a @ b on OpenBLAS pinned to one thread: whole when small, else in blocks that this
    thread and one helper take in turn (``_split_product``)."""
    if a.shape[0] * a.shape[1] * b.shape[1] >= THREADED_PRODUCT:
        return _split_product(a, b)
    with blas.single_threaded():
        return a @ b


def _split_product(a, b):
    """a @ b (M, K) @ (K, N) on two threads that never wait for each other's turn.

    OpenBLAS's own threads meet at barriers inside every product and spin there; on a
    busy 2-core machine a barrier waits for a descheduled thread, the spinning burns the
    core the other needs, and the training step measured 1.9-2.1 s wall and 1.4-1.7 s CPU
    with OpenBLAS threaded against 0.47-0.57 s on one thread. Here the output is cut
    along its longer side (rows of a, or columns of b: a weight gradient ``g.T @ x`` has
    only 256 rows but 1024 columns) into at most ``PRODUCT_PARTS`` blocks of at least
    ``MIN_PART``, claimed one at a time by this thread and a helper (NumPy releases the
    GIL inside each block's product); whoever is running takes the next block, and the
    only wait is for a block already started. Few large blocks: each block is a BLAS
    call with its own packing, and 8 row blocks of 32 rows ran the weight gradients at
    half speed (88 against 234 GF/s for (256, 2048) @ (2048, 256)).
    """
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    by_rows = a.shape[0] >= b.shape[1]
    length = a.shape[0] if by_rows else b.shape[1]
    n_parts = max(1, min(PRODUCT_PARTS, length // MIN_PART))
    bounds = [length * part // n_parts for part in range(n_parts + 1)]
    parts = itertools.count()  # next() is atomic under the GIL: each block is taken once

    def take_blocks():
        while (part := next(parts)) < n_parts:
            cut = slice(bounds[part], bounds[part + 1])
            if by_rows:
                np.matmul(a[cut], b, out=out[cut])
            else:
                np.matmul(a, b[:, cut], out=out[:, cut])

    with blas.single_threaded():
        helper = _product_helper.submit(take_blocks)
        take_blocks()
        helper.result()
    return out


def _two_products(first, second):
    """(first[0] @ first[1], second[0] @ second[1]): the first on this thread, the second
    at the same time on the product helper, each one whole OpenBLAS call on one thread
    (no blocks, no packing twice). If the helper has not started by the time the first
    is done, this thread computes the second too: nobody waits for a thread that is not
    there. Measured, the backward products of the issue-12 model's three Linear shapes
    (alternating in one process): 273 GF/s as two split products, 300 GF/s as a pair;
    its training step 265 -> 258 ms."""
    with blas.single_threaded():
        helper = _product_helper.submit(np.matmul, *second)
        out = np.matmul(*first)
        if helper.cancel():
            return out, np.matmul(*second)
        return out, helper.result()


class Linear(Function):
    """y = x @ weight.T + bias; x (..., in), weight (out, in), bias (out,) or None.

    One BLAS product each for y, dx and dweight (a large forward in row blocks on two
    threads, ``_split_product``; a large backward's dx and dweight, of equal work, one on
    each thread, ``_two_products``); x's rows are a view of x, weight.T a transposed view (BLAS reads
    it with its transpose flag), the bias added in place.
    A forward of at most ``FEW_ROWS`` rows (decoding) is one BLAS matrix-vector product
    per row instead: OpenBLAS's threaded matrix-matrix product costs far more at that size
    (measured on this 2-core machine under load, (8, 256) @ (256, 1024): 0.7-2.2 ms as one
    product, 0.1 ms as 8 matrix-vector products).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])  # (M, in), a view when x is contiguous
        if rows.shape[0] <= FEW_ROWS:
            y = np.empty((rows.shape[0], weight.shape[0]), dtype=np.result_type(rows, weight))
            with blas.single_threaded():
                for r in range(rows.shape[0]):
                    np.matmul(weight, rows[r], out=y[r])  # (out, in) @ (in,)
        else:
            y = _product(rows, weight.T)  # (M, out)
        if bias is not None:
            y += bias
        ctx.save_for_backward(rows, weight)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        g = grad.reshape(-1, weight.shape[0])  # (M, out)
        # forward: y = rows @ weight.T + bias
        #   ->  drows = g @ weight, dweight = g.T @ rows, dbias = sum_rows g
        if need_x and need_weight and g.shape[0] * g.shape[1] * rows.shape[1] >= THREADED_PRODUCT:
            dx, dweight = _two_products((g, weight), (g.T, rows))  # equal work: one a thread
            dx = dx.reshape(ctx.x_shape)
        else:
            dx = _product(g, weight).reshape(ctx.x_shape) if need_x else None
            dweight = _product(g.T, rows) if need_weight else None
        dbias = g.sum(axis=0) if need_bias else None
        return dx, dweight, dbias


# ----------------------------------------------------------------------------- LayerNorm


@split_kernel(0, 4, 5, 6)
def _layer_norm_forward(x, weight, bias, eps, y, mean, rstd):
    rows, n = x.shape
    t = x.dtype.type
    for r in prange(rows):
        xr, yr = x[r], y[r]  # the row as 1-D slices: LLVM vectorises the loops
        total = t(0)
        for j in range(n):
            total += xr[j]
        m = total / t(n)
        square = t(0)
        for j in range(n):
            square += (xr[j] - m) * (xr[j] - m)
        s = t(1) / math.sqrt(square / t(n) + t(eps))
        mean[r], rstd[r] = m, s
        for j in range(n):
            yr[j] = (xr[j] - m) * s * weight[j] + bias[j]


@kernel
def _layer_norm_backward(x, weight, g, mean, rstd, dx, dweight_parts, dbias_parts):
    rows, n = x.shape
    t = x.dtype.type
    chunks = dweight_parts.shape[0]
    for c in prange(chunks):
        dweight, dbias = dweight_parts[c], dbias_parts[c]
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            xr, gr, dxr = x[r], g[r], dx[r]
            m, s = mean[r], rstd[r]
            sum_dxhat, sum_dxhat_xhat = t(0), t(0)
            for j in range(n):
                xhat = (xr[j] - m) * s
                dxhat = gr[j] * weight[j]
                sum_dxhat += dxhat
                sum_dxhat_xhat += dxhat * xhat
                dweight[j] += gr[j] * xhat
                dbias[j] += gr[j]
            mean_dxhat, mean_dxhat_xhat = sum_dxhat / t(n), sum_dxhat_xhat / t(n)
            for j in range(n):
                xhat = (xr[j] - m) * s
                dxr[j] = s * (gr[j] * weight[j] - mean_dxhat - xhat * mean_dxhat_xhat)


class LayerNorm(Function):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance).

    x (..., E), weight (E,), bias (E,). Saved for backward: x and two numbers per row.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, *, eps):
        _check_vectors("LayerNorm", x, weight=weight, bias=bias)
        rows = _rows(x)  # (M, E)
        y = np.empty_like(rows)
        mean = np.empty(rows.shape[0], dtype=x.dtype)
        rstd = np.empty(rows.shape[0], dtype=x.dtype)
        _layer_norm_forward(rows, weight, bias, eps, y, mean, rstd, work=rows.size)
        ctx.save_for_backward(rows, weight, mean, rstd)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, mean, rstd = ctx.saved_tensors
        # forward: y = xhat * weight + bias, xhat = (x - mean) * rstd
        #   ->  dweight = sum_rows g * xhat, dbias = sum_rows g, dxhat = g * weight
        #   ->  dx = rstd * (dxhat - mean_j(dxhat) - xhat * mean_j(dxhat * xhat))
        g = _rows(grad)
        dx = np.empty_like(rows)
        dweight_parts = np.zeros((CHUNKS, rows.shape[1]), dtype=rows.dtype)
        dbias_parts = np.zeros((CHUNKS, rows.shape[1]), dtype=rows.dtype)
        _layer_norm_backward(rows, weight, g, mean, rstd, dx, dweight_parts, dbias_parts,
                             work=rows.size)
        return dx.reshape(grad.shape), dweight_parts.sum(axis=0), dbias_parts.sum(axis=0)


# ----------------------------------------------------------------------------- RMSNorm


@split_kernel(0, 3, 4)
def _rms_norm_forward(x, weight, eps, y, rstd):
    rows, n = x.shape
    t = x.dtype.type
    for r in prange(rows):
        xr, yr = x[r], y[r]
        square = t(0)
        for j in range(n):
            square += xr[j] * xr[j]
        s = t(1) / math.sqrt(square / t(n) + t(eps))
        rstd[r] = s
        for j in range(n):
            yr[j] = xr[j] * s * weight[j]


@kernel
def _rms_norm_backward(x, weight, g, rstd, dx, dweight_parts):
    rows, n = x.shape
    t = x.dtype.type
    chunks = dweight_parts.shape[0]
    for c in prange(chunks):
        dweight = dweight_parts[c]
        for r in range(c * rows // chunks, (c + 1) * rows // chunks):
            xr, gr, dxr = x[r], g[r], dx[r]
            s = rstd[r]
            sum_dxhat_xhat = t(0)
            for j in range(n):
                xhat = xr[j] * s
                sum_dxhat_xhat += gr[j] * weight[j] * xhat
                dweight[j] += gr[j] * xhat
            mean_dxhat_xhat = sum_dxhat_xhat / t(n)
            for j in range(n):
                dxr[j] = s * (gr[j] * weight[j] - xr[j] * s * mean_dxhat_xhat)


class RMSNorm(Function):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis; x (..., E), weight (E,)."""

    @staticmethod
    def forward(ctx, x, weight, *, eps):
        _check_vectors("RMSNorm", x, weight=weight)
        rows = _rows(x)  # (M, E)
        y = np.empty_like(rows)
        rstd = np.empty(rows.shape[0], dtype=x.dtype)
        _rms_norm_forward(rows, weight, eps, y, rstd, work=rows.size)
        ctx.save_for_backward(rows, weight, rstd)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, rstd = ctx.saved_tensors
        # forward: y = xhat * weight, xhat = x * rstd, rstd = (mean_j(x^2) + eps)^(-1/2)
        #   ->  dweight = sum_rows g * xhat, dxhat = g * weight
        #   ->  dx = rstd * (dxhat - xhat * mean_j(dxhat * xhat))
        g = _rows(grad)
        dx = np.empty_like(rows)
        dweight_parts = np.zeros((CHUNKS, rows.shape[1]), dtype=rows.dtype)
        _rms_norm_backward(rows, weight, g, rstd, dx, dweight_parts, work=rows.size)
        return dx.reshape(grad.shape), dweight_parts.sum(axis=0)


# ----------------------------------------------------------------------------- activations
#
# Written with the logistic sigmoid, which fast_exp vectorises (tanh has no such form):
#   silu(x) = x * sigmoid(x)
#   gelu(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u),   u = GELU_C (x + GELU_A x^3)
# since 0.5 (1 + tanh(u)) = sigmoid(2u). sigmoid(z) = 1 / (1 + exp(-z)) with -z clipped
# at EXP_LIMIT: below -80 the sigmoid is < 1e-34 either way, and exp cannot overflow.
# An activation kind is a compile-time constant of the kernels below: 0 SiLU, 1 GELU.
SILU, GELU = 0, 1


@split_kernel(0, 2, align=BLOCK)
def _activation_forward(x, kind, y):
    t = x.dtype.type
    n = x.shape[0]
    for b in prange((n + BLOCK - 1) // BLOCK):
        start, stop = b * BLOCK, min(n, (b + 1) * BLOCK)
        xs, ys = x[start:stop], y[start:stop]  # a block as 0-based slices: LLVM vectorises
        for i in range(stop - start):
            xi = xs[i]
            z = xi if kind == SILU else t(2 * GELU_C) * (xi + t(GELU_A) * xi * xi * xi)
            ys[i] = xi / (t(1) + fast_exp(min(-z, t(EXP_LIMIT))))


@split_kernel(0, 1, 3, align=BLOCK)
def _activation_backward(x, g, kind, dx):
    t = x.dtype.type
    n = x.shape[0]
    for b in prange((n + BLOCK - 1) // BLOCK):
        start, stop = b * BLOCK, min(n, (b + 1) * BLOCK)
        xs, gs, dxs = x[start:stop], g[start:stop], dx[start:stop]
        for i in range(stop - start):
            xi = xs[i]
            if kind == SILU:
                z, dz = xi, t(1)
            else:
                z = t(2 * GELU_C) * (xi + t(GELU_A) * xi * xi * xi)
                dz = t(2 * GELU_C) * (t(1) + t(3 * GELU_A) * xi * xi)
            s = t(1) / (t(1) + fast_exp(min(-z, t(EXP_LIMIT))))
            dxs[i] = gs[i] * (s + xi * s * (t(1) - s) * dz)


@split_kernel(0, 1, 3, align=BLOCK)
def _gated_forward(gate, up, kind, y):
    t = gate.dtype.type
    n = gate.shape[0]
    for b in prange((n + BLOCK - 1) // BLOCK):
        start, stop = b * BLOCK, min(n, (b + 1) * BLOCK)
        gates, ups, ys = gate[start:stop], up[start:stop], y[start:stop]
        for i in range(stop - start):
            xi = gates[i]
            z = xi if kind == SILU else t(2 * GELU_C) * (xi + t(GELU_A) * xi * xi * xi)
            ys[i] = xi / (t(1) + fast_exp(min(-z, t(EXP_LIMIT)))) * ups[i]


@split_kernel(0, 1, 2, 4, 5, align=BLOCK)
def _gated_backward(gate, up, g, kind, dgate, dup):
    t = gate.dtype.type
    n = gate.shape[0]
    for b in prange((n + BLOCK - 1) // BLOCK):
        start, stop = b * BLOCK, min(n, (b + 1) * BLOCK)
        gates, ups, gs = gate[start:stop], up[start:stop], g[start:stop]
        dgates, dups = dgate[start:stop], dup[start:stop]
        for i in range(stop - start):
            xi = gates[i]
            if kind == SILU:
                z, dz = xi, t(1)
            else:
                z = t(2 * GELU_C) * (xi + t(GELU_A) * xi * xi * xi)
                dz = t(2 * GELU_C) * (t(1) + t(3 * GELU_A) * xi * xi)
            s = t(1) / (t(1) + fast_exp(min(-z, t(EXP_LIMIT))))
            dgates[i] = gs[i] * ups[i] * (s + xi * s * (t(1) - s) * dz)
            dups[i] = gs[i] * xi * s


class Activation(Function):
    """``kind`` SILU: x * sigmoid(x); GELU: the tanh approximation. Any shape."""

    @staticmethod
    def forward(ctx, x, *, kind):
        flat = _flat(x)
        y = np.empty_like(flat)
        _activation_forward(flat, kind, y, work=flat.size)
        ctx.save_for_backward(flat)
        ctx.kind = kind
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        # forward: y = x * s, s = sigmoid(z), z = x (SiLU) or 2u (GELU)
        #   ->  dx = g * (s + x * s * (1 - s) * dz/dx)
        dx = np.empty_like(flat)
        _activation_backward(flat, _flat(grad), ctx.kind, dx, work=flat.size)
        return dx.reshape(grad.shape)


class Gated(Function):
    """Gated linear units: SwiGLU act(gate) * up with act SiLU, GeGLU with GELU (tanh).

    gate and up of one shape (e.g. the two halves of one projection, or two projections).
    """

    @staticmethod
    def forward(ctx, gate, up, *, kind):
        if np.shape(gate) != np.shape(up):  # the kernel reads up[i] for every gate[i], unchecked
            raise ValueError(f"gate and up must have one shape, got {np.shape(gate)} and {np.shape(up)}")
        gate_flat, up_flat = _flat(gate), _flat(up)
        y = np.empty_like(gate_flat)
        _gated_forward(gate_flat, up_flat, kind, y, work=y.size)
        ctx.save_for_backward(gate_flat, up_flat)
        ctx.kind = kind
        return y.reshape(gate.shape)

    @staticmethod
    def backward(ctx, grad):
        gate_flat, up_flat = ctx.saved_tensors
        # forward: y = act(gate) * up, act(x) = x * s as in Activation
        #   ->  dgate = g * up * act'(gate), dup = g * act(gate)
        dgate, dup = np.empty_like(gate_flat), np.empty_like(up_flat)
        _gated_backward(gate_flat, up_flat, _flat(grad), ctx.kind, dgate, dup, work=dgate.size)
        shape = grad.shape
        return dgate.reshape(shape), dup.reshape(shape)


def silu(x):
    return Activation.apply(x, kind=SILU)


def gelu(x):
    """GELU, tanh approximation (PyTorch's ``approximate="tanh"``)."""
    return Activation.apply(x, kind=GELU)


def swiglu(gate, up):
    return Gated.apply(gate, up, kind=SILU)


def geglu(gate, up):
    return Gated.apply(gate, up, kind=GELU)


# ----------------------------------------------------------------------------- cross-entropy


@split_kernel(0, 1, 2, 4, 5)
def _cross_entropy_forward(logits, row_max, targets, ignore_index, losses, lse):
    rows, n = logits.shape
    t = logits.dtype.type
    for r in prange(rows):
        row, m = logits[r], row_max[r]
        total = t(0)
        for j in range(n):
            total += fast_exp(row[j] - m)
        lse[r] = m + math.log(total)
        target = targets[r]
        losses[r] = t(0) if target == ignore_index else lse[r] - row[target]


@split_kernel(0, 1, 3, 4, 5)
def _cross_entropy_backward(logits, targets, ignore_index, lse, row_grad, dlogits):
    rows, n = logits.shape
    for r in prange(rows):
        shift, scale = lse[r], row_grad[r]
        for j in range(n):
            dlogits[r, j] = fast_exp(logits[r, j] - shift) * scale
        target = targets[r]
        if target != ignore_index:
            dlogits[r, target] -= scale


class CrossEntropy(Function):
    """logits (M, C), targets (M,) int -> per-row loss (M,), or its mean or sum.

    The semantics of ``losses.CrossEntropy`` (PyTorch's): rows whose target is
    ``ignore_index`` give 0 and are not counted by "mean". Saved for backward: one lse
    per row instead of the (M, C) log-probabilities. The kernels index with the targets
    unchecked: call it through ``cross_entropy``, which validates them.
    """

    @staticmethod
    def forward(ctx, logits, *, targets, ignore_index, reduction):
        logits = np.ascontiguousarray(logits)
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        losses = np.empty(logits.shape[0], dtype=logits.dtype)
        lse = np.empty(logits.shape[0], dtype=logits.dtype)
        # the row max in NumPy, whose max is vectorised (a compiled max loop is not: without
        # "nnan" LLVM keeps it scalar, 3x the time of the exp sweep); NaN propagates
        row_max = logits.max(axis=1)  # (M,)
        _cross_entropy_forward(logits, row_max, targets, ignore_index, losses, lse, work=logits.size)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        ctx.count = int(np.count_nonzero(targets != ignore_index))
        return reduce_losses(losses, ctx.count, reduction)

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        # forward: loss_m = lse_m - logits_m[t_m]
        #   ->  dlogits_m = (exp(logits_m - lse_m) - one_hot(t_m)) * row_grad_m,
        # row_grad the upstream gradient by reduction (grad_m, grad, grad / count), 0 on
        # ignored rows
        if ctx.reduction == "none":
            row_grad = np.asarray(grad, dtype=logits.dtype)
        else:
            per_row = grad / max(ctx.count, 1) if ctx.reduction == "mean" else grad
            row_grad = np.full(len(targets), per_row, dtype=logits.dtype)
        row_grad = np.where(targets != ctx.ignore_index, row_grad, 0).astype(logits.dtype)
        dlogits = np.empty_like(logits)
        _cross_entropy_backward(logits, targets, ctx.ignore_index, lse, row_grad, dlogits,
                                work=logits.size)
        return dlogits


def cross_entropy(logits, targets, ignore_index: int = -100, reduction: str = "mean"):
    """``losses.cross_entropy`` (same arguments, errors and results) on the fused kernel.

    logits (..., C) Tensor, targets (...) int -> a scalar ("mean", "sum") or (...) ("none").
    """
    return apply_cross_entropy(CrossEntropy, logits, targets, ignore_index, reduction)


# ----------------------------------------------------------------------------- Embedding

COLUMNS = 256  # embedding columns per task of the backward


@kernel
def _embedding_backward(tokens, g, dweight):
    rows, n = g.shape
    for b in prange((n + COLUMNS - 1) // COLUMNS):
        start, stop = b * COLUMNS, min(n, (b + 1) * COLUMNS)
        for r in range(rows):
            dweight_row, g_row = dweight[tokens[r], start:stop], g[r, start:stop]
            for j in range(stop - start):
                dweight_row[j] += g_row[j]


class Embedding(Function):
    """weight (V, E), tokens (...) int in [0, V) -> weight[tokens] (..., E).

    Backward: each task owns a range of columns and adds every row of the gradient into
    its token's row there, so repeated tokens add up with no atomics, in a fixed order.
    """

    @staticmethod
    def forward(ctx, weight, *, tokens):
        ctx.tokens, ctx.weight_shape = tokens, weight.shape
        return np.take(weight, tokens, axis=0)  # (..., E)

    @staticmethod
    def backward(ctx, grad):
        # forward: out[i] = weight[tokens[i]]  ->  dweight[tokens[i]] += grad[i]
        dweight = np.zeros(ctx.weight_shape, dtype=grad.dtype)
        tokens = np.ascontiguousarray(ctx.tokens, dtype=np.int64).reshape(-1)
        _embedding_backward(tokens, _rows(grad), dweight, work=grad.size)
        return dweight


# ----------------------------------------------------------------------------- AdamW


@kernel
def _adamw_update(param, grad, exp_avg, exp_avg_sq, hyper):
    t = param.dtype.type
    decay, beta1, beta2 = t(hyper[0]), t(hyper[1]), t(hyper[2])
    step_size, sqrt_bias_correction2, eps = t(hyper[3]), t(hyper[4]), t(hyper[5])
    n = param.shape[0]
    for b in prange((n + BLOCK - 1) // BLOCK):
        start, stop = b * BLOCK, min(n, (b + 1) * BLOCK)
        ps, gs, ms, vs = param[start:stop], grad[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop]
        for i in range(stop - start):
            g = gs[i]
            m = beta1 * ms[i] + (t(1) - beta1) * g
            v = beta2 * vs[i] + (t(1) - beta2) * g * g
            ms[i], vs[i] = m, v
            ps[i] = ps[i] * decay - step_size * m / (math.sqrt(v) / sqrt_bias_correction2 + eps)


def adamw_update(param, grad, exp_avg, exp_avg_sq, *, step, lr, betas, eps, weight_decay):
    """One AdamW step on arrays, in place (``param``, ``exp_avg``, ``exp_avg_sq``), in one
    pass over memory; the maths of ``optim.AdamW``'s docstring (PyTorch's)::

        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g^2
        p -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

    The arrays must be C-contiguous (flat views are updated); ``step`` counts from 1.
    """
    beta1, beta2 = betas
    hyper = np.array([1 - lr * weight_decay, beta1, beta2, lr / (1 - beta1**step),
                      math.sqrt(1 - beta2**step), eps])
    flats = [a.reshape(-1) for a in (param, grad, exp_avg, exp_avg_sq)]
    _adamw_update(*flats, hyper, work=param.size)
