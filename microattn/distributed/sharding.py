"""Which rows of a sequence each rank holds, and moving between the whole and the shards.

Two layouts of a sequence of N rows over P ranks (rank r of P)::

    contiguous   N = P * c:   rank r holds rows [r c, (r + 1) c)
    zigzag       N = 2P * c:  rank r holds chunks r and 2P - 1 - r of 2P chunks of c rows

    N = 8, P = 2, zigzag: chunks 0 1 2 3 -> rank 0 holds chunks 0 and 3 (rows 0,1 and 6,7),
                                            rank 1 holds chunks 1 and 2 (rows 2..5)

Under a causal mask a row's work grows with its position, so the contiguous layout gives
the last rank all the long rows; zigzag pairs an early chunk with a late one and every rank
gets the same amount of work (Brandon et al. 2023 "striped"/zigzag ring attention balance).

``positions`` is the one place these layouts are defined; ``shard`` and ``gather`` and the
sequence-parallel attention all read it.

Argument errors are found on every rank alike before any communication where the check is
local (a length not divisible), and through one ``allgather`` of the shapes where it is
not (shapes that differ across ranks): every rank raises the same ValueError, none hangs.
"""

from __future__ import annotations

import numpy as np

from ..autograd import Function
from ..tensor import Tensor

LAYOUTS = ("contiguous", "zigzag")


def positions(n: int, size: int, rank: int, layout: str = "contiguous") -> np.ndarray:
    """The global indices of the rows rank ``rank`` of ``size`` holds, in its local order.

    >>> positions(8, 2, 0, "zigzag").tolist()
    [0, 1, 6, 7]
    """
    chunks = check_length(n, size, layout)
    c = n // chunks
    if layout == "contiguous":
        return np.arange(rank * c, (rank + 1) * c)
    return np.concatenate([np.arange(rank * c, (rank + 1) * c),
                           np.arange((2 * size - 1 - rank) * c, (2 * size - rank) * c)])


def check_length(n: int, size: int, layout: str) -> int:
    """The number of equal chunks ``layout`` cuts n rows into; ValueError if it cannot."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    chunks = size if layout == "contiguous" else 2 * size
    if n % chunks:
        raise ValueError(f"a sequence of {n} rows cannot be cut into the {chunks} equal chunks the "
                         f"{layout!r} layout needs over {size} ranks (a multiple of {chunks} is)")
    return chunks


def check_same_everywhere(comm, what: str, value) -> None:
    """Raise the same ValueError on every rank unless ``value`` is equal on every rank."""
    values = comm.allgather(value)
    if any(v != values[0] for v in values):
        raise ValueError(f"{what} differs across ranks: " + ", ".join(
            f"rank {r}: {v}" for r, v in enumerate(values)))


def local_operands(query, key, value, comm, layout, dropout_p, seed):
    """(q, k, v, n, seed) for a sequence-parallel attention call: this rank's shards as
    Tensors, checked alike on every rank before any other message (the same shapes on every
    rank, (B, H, n, D) with the same n rows of q, k and v, a length the layout can cut),
    and the dropout seed every rank shares (None: drawn on rank 0 and broadcast)."""
    q, k, v = (x if isinstance(x, Tensor) else Tensor(np.asarray(x)) for x in (query, key, value))
    check_same_everywhere(comm, "the shapes of query, key, value",
                          (q.shape, k.shape, v.shape, str(q.dtype)))
    if len(q.shape) != 4 or len(k.shape) != 4 or len(v.shape) != 4:
        raise ValueError(f"query, key, value must be (B, H, N/P, D); got {q.shape}, {k.shape}, {v.shape}")
    n = q.shape[2]
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"query, key and value must hold the same rows; got {n}, {k.shape[2]}, {v.shape[2]}")
    check_length(n * comm.size, comm.size, layout)
    if dropout_p > 0 and seed is None:
        seed = comm.bcast(int(np.random.randint(0, 2**63 - 1, dtype=np.int64)) if comm.rank == 0 else None)
    return q, k, v, n, seed


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    return axis % ndim


class Shard(Function):
    """This rank's rows of the whole x (every rank holds the whole x)."""

    @staticmethod
    def forward(ctx, x, *, rows, axis):
        ctx.shape, ctx.rows, ctx.axis = x.shape, rows, axis
        return np.take(x, rows, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        # forward: local = x[rows]  ->  dx[rows] = grad, zero elsewhere
        dx = np.zeros(ctx.shape, dtype=grad.dtype)
        index = [slice(None)] * len(ctx.shape)
        index[ctx.axis] = ctx.rows
        dx[tuple(index)] = grad
        return dx


def _gather_rows(x_local, comm, layout, axis):
    """(whole, index): every rank's rows put in their global places, and the index of this
    rank's rows in the whole."""
    pieces = comm.allgather(np.ascontiguousarray(x_local))
    n = x_local.shape[axis] * comm.size
    whole = np.empty(x_local.shape[:axis] + (n,) + x_local.shape[axis + 1:], dtype=x_local.dtype)
    index = [slice(None)] * x_local.ndim
    for rank, piece in enumerate(pieces):
        index[axis] = positions(n, comm.size, rank, layout)
        whole[tuple(index)] = piece
    index[axis] = positions(n, comm.size, comm.rank, layout)
    return whole, tuple(index)


class Gather(Function):
    """The whole sequence on every rank, from every rank's rows."""

    @staticmethod
    def forward(ctx, x_local, *, comm, layout, axis):
        whole, ctx.index = _gather_rows(x_local, comm, layout, axis)
        return whole

    @staticmethod
    def backward(ctx, grad):
        # forward: whole[rows of rank r] = x_local of rank r; every rank computes the same
        # loss of the whole, as one process would  ->  d x_local = grad[this rank's rows]
        return grad[ctx.index]


def shard(x, comm, layout: str = "contiguous", axis: int = 2):
    """This rank's rows of ``x`` (every rank passes the whole x) along ``axis``.

    A Tensor gives a Tensor (the gradient flows back into x's rows), an array an array.
    """
    data = x.data if isinstance(x, Tensor) else np.asarray(x)
    axis = _axis(axis, data.ndim)
    check_same_everywhere(comm, "the shape of x", data.shape)
    rows = positions(data.shape[axis], comm.size, comm.rank, layout)
    if isinstance(x, Tensor):
        return Shard.apply(x, rows=rows, axis=axis)
    return np.take(data, rows, axis=axis)


def gather(x_local, comm, layout: str = "contiguous", axis: int = 2):
    """The whole sequence on every rank from each rank's rows ``x_local`` along ``axis``."""
    data = x_local.data if isinstance(x_local, Tensor) else np.asarray(x_local)
    axis = _axis(axis, data.ndim)
    check_same_everywhere(comm, "the shape of x_local", (data.shape, str(data.dtype)))
    check_length(data.shape[axis] * comm.size, comm.size, layout)
    if isinstance(x_local, Tensor):
        return Gather.apply(x_local, comm=comm, layout=layout, axis=axis)
    return _gather_rows(data, comm, layout, axis)[0]
