"""Ulysses sequence parallelism (Jacobs et al. 2023, DeepSpeed-Ulysses): trade the sequence
shards for head shards with one all-to-all, attend locally, trade back.

Rank r of P holds the rows ``positions(N, P, r, layout)`` of every head; after the
all-to-all it holds **every row of heads** ``[r H/P, (r + 1) H/P)`` (and kv heads ``[r
Hkv/P, (r + 1) Hkv/P)``: a query head's kv head, ``h // group``, falls in the same rank's
share when P divides Hkv). Each rank then runs ordinary attention, any backend, over the
whole sequence of its heads, and a second all-to-all returns the output rows to their
owners::

    q (B, H, N/P, D) --all-to-all--> (B, H/P, N, D) --attention--> (B, H/P, N, Dv)
                                                     --all-to-all--> out (B, H, N/P, Dv)

Shape legend: B batch, H (Hkv) query (kv) heads, N the whole length, P ranks, D head dim.

The backward is the two all-to-alls transposed (a gradient goes back the way its value
came) around the attention backward. Causal masks, windows and masks are by global
positions automatically, since each rank sees the whole sequence in order; dropout hashes
the global head index (the spec's ``origin``), so the mask is the one-process mask.
Communication: each rank sends and receives (P - 1)/P of its q, k, v and out once each way.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import backends
from .. import functional as F
from ..autograd import Function
from ..kernels.spec import make_attention_spec
from .sharding import local_operands, positions


def _seq_to_heads(x, comm, layout):
    """(B, H, n, X) rows of this rank -> (B, H/P, N, X) every row of this rank's heads."""
    P = comm.size
    B, H, n, X = x.shape
    send = np.ascontiguousarray(x.reshape(B, P, H // P, n, X).transpose(1, 0, 2, 3, 4))
    received = np.empty(send.shape, dtype=send.dtype)  # received[r]: rank r's rows of my heads
    comm.Alltoall(send, received)
    whole = np.empty((B, H // P, n * P, X), dtype=x.dtype)
    for rank in range(P):
        whole[:, :, positions(n * P, P, rank, layout)] = received[rank]
    return whole


def _heads_to_seq(x, comm, layout):
    """(B, H/P, N, X) every row of this rank's heads -> (B, H, n, X) this rank's rows."""
    P = comm.size
    B, Hp, N, X = x.shape
    send = np.ascontiguousarray(np.stack([x[:, :, positions(N, P, rank, layout)]
                                          for rank in range(P)]))  # (P, B, H/P, n, X)
    received = np.empty(send.shape, dtype=send.dtype)  # received[r]: this rank's rows of rank r's heads
    comm.Alltoall(send, received)
    return np.ascontiguousarray(received.transpose(1, 0, 2, 3, 4).reshape(B, Hp * P, N // P, X))


class SeqToHeads(Function):
    """All-to-all from sequence shards to head shards."""

    @staticmethod
    def forward(ctx, x, *, comm, layout):
        ctx.comm, ctx.layout = comm, layout
        return _seq_to_heads(x, comm, layout)

    @staticmethod
    def backward(ctx, grad):
        # forward: whole[heads of r][rows of s] = x of rank s  ->  the gradient goes back
        return _heads_to_seq(grad, ctx.comm, ctx.layout)


class HeadsToSeq(Function):
    """All-to-all from head shards back to sequence shards."""

    @staticmethod
    def forward(ctx, x, *, comm, layout):
        ctx.comm, ctx.layout = comm, layout
        return _heads_to_seq(x, comm, layout)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.comm, ctx.layout)


def ulysses_attention(query, key, value, *, comm, attn_mask=None, is_causal=False, window=None,
                      scale=None, dropout_p=0.0, seed=None, layout="contiguous",
                      return_lse=False, backend="auto"):
    """Attention over the whole sequence, each rank holding its rows (``layout``).

    query (B, H, N/P, D), key (B, Hkv, N/P, D), value (B, Hkv, N/P, Dv): this rank's rows
    -> out (B, H, N/P, Dv) this rank's rows (and lse (B, H, N/P) with ``return_lse``).
    ``attn_mask``: the whole (.., N, N) mask, the same on every rank (its heads axis, if
    any, is sliced to this rank's heads). Other arguments as
    ``F.scaled_dot_product_attention``; ``seed`` must be the same on every rank (None
    draws one on rank 0 and broadcasts it).
    """
    q, k, v, n, seed = local_operands(query, key, value, comm, layout, dropout_p, seed)
    P, rank = comm.size, comm.rank
    H, Hkv = q.shape[1], k.shape[1]
    if H % P or Hkv % P:
        raise ValueError(f"ulysses_attention splits the heads over the ranks: query heads ({H}) "
                         f"and kv heads ({Hkv}) must be multiples of the {P} ranks")
    N = n * P
    mask = None if attn_mask is None else np.asarray(getattr(attn_mask, "data", attn_mask))
    if mask is not None and mask.ndim == 4 and mask.shape[1] == H:
        mask = mask[:, rank * H // P:(rank + 1) * H // P]
    # validates everything else (before any communication) on the local head shapes
    spec = make_attention_spec((q.shape[0], H // P, N, q.shape[3]), (k.shape[0], Hkv // P, N, k.shape[3]),
                               (v.shape[0], Hkv // P, N, v.shape[3]), (q.dtype, k.dtype, v.dtype),
                               attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                               scale=scale, window=window, seed=seed)
    spec = dataclasses.replace(spec, origin=(rank * H // P, 0, 0))  # dropout: global heads
    backends.resolve(backend, "scaled_dot_product_attention")  # an unknown backend: before any transfer
    qh, kh, vh = (SeqToHeads.apply(x, comm=comm, layout=layout) for x in (q, k, v))
    out, lse = F.attend(qh, kh, vh, spec, backend, return_lse=return_lse)
    out = HeadsToSeq.apply(out, comm=comm, layout=layout)
    if return_lse:  # differentiable too: its gradient goes back by the same all-to-alls
        return out, HeadsToSeq.apply(lse.reshape(*lse.shape, 1), comm=comm, layout=layout)[..., 0]
    return out
