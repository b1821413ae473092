"""Packed variable-length sequences (flash-attention's ``cu_seqlens``), on any kernel module.

S sequences of different lengths packed into one row (B = 1): sequence s owns queries
``[cu_q[s], cu_q[s+1])`` and keys ``[cu_k[s], cu_k[s+1])`` and attends only within itself::

    cu_seqlens_q = cu_seqlens_k = [0, 3, 8, 10]        three sequences of 3, 5 and 2 tokens

              keys  0 1 2 | 3 4 5 6 7 | 8 9
    queries 0..2    ■ ■ ■ |           |             each sequence a block on the diagonal;
    queries 3..7          | ■ ■ ■ ■ ■ |             causal and windows apply inside a block,
    queries 8..9          |           | ■ ■         bottom-right aligned per sequence

**Each sequence is an ordinary kernel call** on a spec placed in the whole: its own lengths
(so ``is_causal`` and ``window`` align bottom-right within the sequence, and ALiBi's distance
is the sequence's), the float mask's block, and the ``origin`` of its first query and key in
the packed row, so dropout hashes packed positions (query i and key j of the packed row: the
mask a dense call with the block-diagonal mask would draw). Blocks off the diagonal are never
touched: the cost is the sum over sequences of n_q * n_k, not (sum n)^2. The backward is the
same loop (every sequence's dq rows and dk/dv rows are its own: nothing is summed across
sequences). A sequence with queries but no keys gives zeros and lse -inf, as a fully masked
row does; one with no queries costs nothing.

This wraps a kernel module of the protocol (``protocol.py``) and is one itself
(:class:`Varlen`); ``functional.attend`` wraps the backend's kernel in it when the spec
carries ``cu_seqlens``. Shapes: q (1, Hq, Nq, D), k (1, Hkv, Nk, D), v (1, Hkv, Nk, Dv),
Nq = cu_q[-1], Nk = cu_k[-1].
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .spec import AttentionSpec


def sequences(spec: AttentionSpec):
    """(queries slice, keys slice, the sequence's spec) for every sequence with queries."""
    cu_q, cu_k = spec.cu_seqlens_q, spec.cu_seqlens_k
    h0, i0, j0 = spec.origin
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if q1 == q0:
            continue
        bias = None if spec.bias is None else spec.bias[:, :, q0:q1, k0:k1]
        yield slice(q0, q1), slice(k0, k1), dataclasses.replace(
            spec, Nq=q1 - q0, Nk=k1 - k0, bias=bias, origin=(h0, i0 + q0, j0 + k0),
            cu_seqlens_q=None, cu_seqlens_k=None)


def _identity(x):
    return x


class Varlen:
    """A kernel module (the protocol's forward and backward) running ``inner`` once per
    sequence of the spec's ``cu_seqlens``."""

    def __init__(self, inner):
        self.inner = inner
        self.__name__ = f"varlen({getattr(inner, '__name__', type(inner).__name__)})"
        # no to_device / to_host hooks: the arrays stay on the host between the calls, and
        # each sequence's call moves its own slices (a device kernel's hooks, used below)

    def forward(self, q, k, v, spec: AttentionSpec):
        to_host = getattr(self.inner, "to_host", _identity)
        q, k, v = to_host(q), to_host(k), to_host(v)
        # every query row belongs to one sequence, which writes it: no zero-fill of the whole
        # (first-touch zeroing of a 33 MB buffer cost as much as a short sequence's kernel)
        out = np.empty((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
        stats = np.empty((2, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)
        for rows, cols, sub in sequences(spec):
            if sub.Nk == 0:  # queries with no key: out 0, (m, l) = (-inf, 0)
                out[:, :, rows], stats[0, :, :, rows], stats[1, :, :, rows] = 0, -np.inf, 0
                continue
            o, st = self.inner.forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], sub)
            out[:, :, rows], stats[:, :, :, rows] = to_host(o), to_host(st)
        return out, stats

    def backward(self, q, k, v, out, stats, dout, spec: AttentionSpec, dlse=None):
        to_host = getattr(self.inner, "to_host", _identity)
        q, k, v, out, stats, dout = (to_host(x) for x in (q, k, v, out, stats, dout))
        dlse = None if dlse is None else to_host(dlse)
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        cu_k = spec.cu_seqlens_k
        for s in range(len(cu_k) - 1):  # keys of sequences without queries get no gradient
            if spec.cu_seqlens_q[s + 1] == spec.cu_seqlens_q[s]:
                dk[:, :, cu_k[s]:cu_k[s + 1]] = 0
                dv[:, :, cu_k[s]:cu_k[s + 1]] = 0
        for rows, cols, sub in sequences(spec):
            if sub.Nk == 0:
                dq[:, :, rows] = 0
                continue
            grads = self.inner.backward(
                q[:, :, rows], k[:, :, cols], v[:, :, cols], out[:, :, rows],
                stats[:, :, :, rows], dout[:, :, rows], sub,
                dlse=None if dlse is None else dlse[:, :, rows])
            dq[:, :, rows], dk[:, :, cols], dv[:, :, cols] = (to_host(g) for g in grads)
        return dq, dk, dv
