"""Ring attention: each rank keeps its query rows; key/value blocks travel round the ring.

P ranks in a ring, rank r holding rows ``positions(N, P, r, layout)`` of q, k and v. At
step t = 0 .. P-1 rank r holds the K/V block of rank ``(r - t) mod P``, attends its own
queries to it with any kernel module, and passes the block on to rank r + 1 (the transfer
of the next block overlaps the kernel: non-blocking send and receive are posted first)::

    step 0      step 1      step 2      step 3         (P = 4; rank r holds K/V of ...)
    r0: K0      r0: K3      r0: K2      r0: K1
    r1: K1      r1: K0      r1: K3      r1: K2
    ...

Each (query chunk, key chunk) pair is an ordinary kernel call on a spec that knows where
the pair lies in the whole (``origin`` for dropout's indices, ``band_offset`` for causal
and windows, the mask's rows and columns sliced): the results are the exact rows of the
one-process attention restricted to those keys. Pairs the band excludes entirely (causal:
keys after every query of the chunk) are not computed. Each step's partial result (out, m,
l) is merged at once into the chunk's running state by :func:`ring_step` (the one step of
the ring, also exercise 10: ``microattn exercise start 10 DIR``), with ``merge.merge_rows``,
the formula of the split-KV merge::

    m = max(m_a, m_b),   l = l_a e^(m_a - m) + l_b e^(m_b - m),   out = (l_a e^(m_a - m) out_a
                                                                        + l_b e^(m_b - m) out_b) / l

Causal (and windows) by *global* position: local query i of a chunk starting at row
``q_start`` may see local key j of a block starting at ``k_start`` iff ``j <= i + offset``
with ``offset = global_offset(q_start, k_start) = q_start - k_start`` (plus the whole's own
bottom-right offset): the pair's spec gets it as ``band_offset``.

Backward: the kernels' backward takes the *final* out and row statistics (m, l), so each
pair recomputes its share of the global probabilities ``p = exp(s - m) / l`` and delta =
rowsum(out * dout) is the global one: dq of the pair adds into this rank's dq; dk, dv
add into accumulators that travel round the ring with their K/V block and arrive back at
their owner after P steps. Every sum is taken in a fixed order: reruns are bit-identical.

Layouts (``sharding.py``): with a causal mask, contiguous rows give the last rank all the
long rows, so ranks wait for it; zigzag gives rank r chunks r and 2P-1-r and every rank
the same number of unmasked pairs.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .. import backends
from ..autograd import Function
from ..kernels import masking
from ..kernels.merge import merge_rows
from ..kernels.protocol import lse_of
from ..kernels.spec import make_attention_spec
from .sharding import local_operands, positions


def _identity(x):
    return x


def global_offset(q_start: int, k_start: int) -> int:
    """The band offset of a (query chunk, key block) pair taken from the whole sequence.

    Local query i is global row ``q_start + i``, local key j global row ``k_start + j``;
    causal in the whole (``k_start + j <= q_start + i``) is ``j <= i + (q_start - k_start)``
    locally. (The whole's own offset, ``Nk - Nq`` bottom-right, is added by the spec.)
    """
    return q_start - k_start


def empty_state(shape, Dv: int, dtype):
    """The running state of query rows that have seen no key yet: out 0, m = -inf, l = 0.

    shape: the rows (B, H, n) -> (out (B, H, n, Dv), m (B, H, n), l (B, H, n))."""
    return (np.zeros((*shape, Dv), dtype=dtype), np.full(shape, -np.inf, dtype=dtype),
            np.zeros(shape, dtype=dtype))


def ring_step(state, q, k, v, q_start: int, k_start: int, attend):
    """One step of ring attention for one query chunk: attend it to the K/V block held now
    and merge the result into the chunk's running state.

    state   (out, m, l): the chunk's attention over the blocks seen so far: out (B, H, n, Dv)
            normalised, m and l (B, H, n) its row statistics (shift, sum of exp(s - m));
            :func:`empty_state` before the first block
    q       (B, H, n, D)     the chunk's queries: global rows q_start .. q_start + n
    k, v    (B, Hkv, c, D), (B, Hkv, c, Dv): the block held: global rows k_start .. k_start + c
    attend  attend(q, k, v, offset) -> (out, stats) or None: the kernel on this pair, local
            query i seeing local key j iff ``j <= i + offset`` under the whole's causal mask
            (or window); out (B, H, n, Dv), stats (2, B, H, n) = (m, l); None when the band
            allows no pair (nothing to merge)
    returns the new state (out, m, l)
    """
    part = attend(q, k, v, global_offset(q_start, k_start))
    if part is None:
        return state
    out_b, (m_b, l_b) = part
    out_a, m_a, l_a = state
    # merge.merge_rows: m = max, each part's l rescaled by exp(m_x - m), weights l_x' / l
    m, l, w_a, w_b = merge_rows(m_a, l_a, m_b, l_b)
    return w_a[..., None] * out_a + w_b[..., None] * out_b, m, l


class Ring:
    """One ring attention call: the communicator, the layout, the kernel, and the spec of
    every (query chunk, key chunk) pair, built once and used by forward and backward."""

    def __init__(self, comm, layout, n, whole, kernel, shapes):
        self.comm, self.layout, self.n, self.whole, self.kernel = comm, layout, n, whole, kernel
        self.B, self.H, self.Hkv, self.D, self.Dv = shapes
        self.to_host = getattr(kernel, "to_host", _identity)
        self._specs = {}
        self.seconds = {"kernel": 0.0, "wait": 0.0}  # where this call's time went (benchmarks)

    def chunks(self, rank):
        """[(global start, length, local start)] of rank's rows: one chunk, or two (zigzag)."""
        rows = positions(self.n * self.comm.size, self.comm.size, rank, self.layout)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(rows)]])
        return [(int(rows[a]), int(b - a), int(a)) for a, b in zip(starts, stops)]

    def pair_spec(self, qa, qlen, ka, klen, offset):
        """The spec of queries [qa, qa + qlen) against keys [ka, ka + klen) of the whole, or
        None when the band allows no pair (nothing to compute). ``offset``: the pair's
        :func:`global_offset`, ``qa - ka``."""
        key = (qa, ka, offset)
        if key not in self._specs:
            w = self.whole
            bias = None if w.bias is None else w.bias[:, :, qa:qa + qlen, ka:ka + klen]
            window = (w.window_left, w.window_right) if w.has_band else None
            spec = make_attention_spec(
                (self.B, self.H, qlen, self.D), (self.B, self.Hkv, klen, self.D),
                (self.B, self.Hkv, klen, self.Dv), (w.dtype,) * 3, attn_mask=bias,
                dropout_p=w.dropout_p, is_causal=w.causal, scale=w.scale,
                window=None if w.causal and window == (-1, 0) else window, seed=w.seed)
            spec = dataclasses.replace(spec, origin=(0, qa, ka), band_offset=w.offset + offset)
            j_start, j_stop = masking.key_range(spec.band, 0, qlen, klen)
            self._specs[key] = spec if j_start < j_stop else None
        return self._specs[key]

    def pairs(self, owner):
        """(query chunk, key chunk, spec) for every pair with work against owner's block."""
        for qa, qlen, qoff in self.chunks(self.comm.rank):
            for ka, klen, koff in self.chunks(owner):
                spec = self.pair_spec(qa, qlen, ka, klen, global_offset(qa, ka))
                if spec is not None:
                    yield slice(qoff, qoff + qlen), slice(koff, koff + klen), spec

    def shift(self, arrays, wait_for=None):
        """Post the send of ``arrays`` (packed in one buffer) to the next rank and the
        receive of the previous rank's; returns a function that waits and unpacks."""
        from mpi4py import MPI

        comm = self.comm
        send = np.concatenate([a.ravel() for a in arrays])
        received = np.empty_like(send)
        requests = [comm.Isend(send, dest=(comm.rank + 1) % comm.size, tag=7),
                    comm.Irecv(received, source=(comm.rank - 1) % comm.size, tag=7)]

        def finish():
            started = time.perf_counter()
            MPI.Request.Waitall(requests)
            self.seconds["wait"] += time.perf_counter() - started
            out, offset = [], 0
            for a in arrays:
                out.append(received[offset:offset + a.size].reshape(a.shape))
                offset += a.size
            return out

        return finish

    def attend(self, qa, qlen, ka, klen):
        """``ring_step``'s ``attend`` for queries [qa, qa + qlen) and keys [ka, ka + klen)."""
        def attend(q, k, v, offset):
            spec = self.pair_spec(qa, qlen, ka, klen, offset)
            if spec is None:
                return None
            started = time.perf_counter()
            out, stats = self.kernel.forward(q, k, v, spec)
            out, stats = self.to_host(out), self.to_host(stats)
            self.seconds["kernel"] += time.perf_counter() - started
            return out, stats
        return attend

    def forward(self, q, k, v):
        P, rank = self.comm.size, self.comm.rank
        mine = self.chunks(rank)
        states = {qoff: empty_state((self.B, self.H, qlen), self.Dv, q.dtype) for _, qlen, qoff in mine}
        held = [np.ascontiguousarray(k), np.ascontiguousarray(v)]
        for t in range(P):
            owner = (rank - t) % P
            finish = self.shift(held) if t < P - 1 else None  # the next block, meanwhile
            for qa, qlen, qoff in mine:
                rows = slice(qoff, qoff + qlen)
                for ka, klen, koff in self.chunks(owner):
                    cols = slice(koff, koff + klen)
                    states[qoff] = ring_step(states[qoff], q[:, :, rows], held[0][:, :, cols],
                                             held[1][:, :, cols], qa, ka, self.attend(qa, qlen, ka, klen))
            if finish is not None:
                held = finish()
        n, dtype = q.shape[2], q.dtype
        out = np.empty((self.B, self.H, n, self.Dv), dtype=dtype)
        stats = np.empty((2, self.B, self.H, n), dtype=dtype)
        for qoff, (o, m, l) in states.items():  # a chunk that saw no key: out 0, (m, l) = (-inf, 0)
            rows = slice(qoff, qoff + o.shape[2])
            out[:, :, rows], stats[0, :, :, rows], stats[1, :, :, rows] = o, m, l
        return out, stats

    def backward(self, q, k, v, out, stats, dout, dlse=None):
        P, rank = self.comm.size, self.comm.rank
        dq = np.zeros_like(q)
        held = [np.ascontiguousarray(k), np.ascontiguousarray(v), np.zeros_like(k), np.zeros_like(v)]
        for t in range(P):
            owner = (rank - t) % P
            k_blk, v_blk, dk_blk, dv_blk = held
            started = time.perf_counter()
            for rows, cols, spec in self.pairs(owner):
                dq_c, dk_c, dv_c = self.kernel.backward(
                    q[:, :, rows], k_blk[:, :, cols], v_blk[:, :, cols], out[:, :, rows],
                    stats[:, :, :, rows], dout[:, :, rows], spec,
                    dlse=None if dlse is None else dlse[:, :, rows])
                dq[:, :, rows] += self.to_host(dq_c)
                dk_blk[:, :, cols] += self.to_host(dk_c)
                dv_blk[:, :, cols] += self.to_host(dv_c)
            self.seconds["kernel"] += time.perf_counter() - started
            held = self.shift(held)() if P > 1 else held  # after P shifts: our own block
        return dq, held[2], held[3]


class RingAttention(Function):
    """out = attention of this rank's queries over every rank's keys (see the module).

    ``with_lse``: out and lse packed along the last axis, as ``functional.Attention`` does,
    so that lse is differentiable (its gradient enters every pair's backward as dlse)."""

    @staticmethod
    def forward(ctx, q, k, v, *, ring, with_lse=False):
        out, stats = ring.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.ring, ctx.with_lse = ring, with_lse
        if not with_lse:
            return out
        return np.concatenate([out, lse_of(stats)[..., None]], axis=-1)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, stats = ctx.saved_tensors
        dlse = None
        if ctx.with_lse:  # forward: result = concatenate([out, lse], -1)
            grad, dlse = grad[..., :-1], np.ascontiguousarray(grad[..., -1])
        return ctx.ring.backward(q, k, v, out, stats, np.ascontiguousarray(grad), dlse)


def ring_attention(query, key, value, *, comm, attn_mask=None, is_causal=False, window=None,
                   scale=None, dropout_p=0.0, seed=None, layout="contiguous", return_lse=False,
                   backend="auto"):
    """Attention over the whole sequence, each rank holding its rows (``layout``), by ring.

    query (B, H, N/P, D), key (B, Hkv, N/P, D), value (B, Hkv, N/P, Dv): this rank's rows
    -> out (B, H, N/P, Dv), this rank's rows (and lse (B, H, N/P), differentiable, with
    ``return_lse``). ``attn_mask``: the whole (.., N, N) mask, the same on every rank.
    Other arguments as ``F.scaled_dot_product_attention``; ``seed`` must be the same on
    every rank (None: drawn on rank 0 and broadcast). ``backend``: a kernel module's name
    ("reference", "numba", "cuda" or "auto"); "composed" has no kernel to call per block.
    """
    q, k, v, n, seed = local_operands(query, key, value, comm, layout, dropout_p, seed)
    P = comm.size
    mask = None if attn_mask is None else np.asarray(getattr(attn_mask, "data", attn_mask))
    N = n * P
    B, H, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    whole = make_attention_spec((B, H, N, D), (B, Hkv, N, D), (B, Hkv, N, Dv), (q.dtype, k.dtype, v.dtype),
                                attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, window=window, seed=seed)
    name, kernel = backends.resolve(backend, "scaled_dot_product_attention")
    if name == "composed":
        raise ValueError('ring_attention calls a kernel module per block; backend="composed" has '
                         'none (use "reference", "numba", "cuda" or "auto")')
    ring = Ring(comm, layout, n, whole, kernel, (B, H, Hkv, D, Dv))
    if not return_lse:
        return RingAttention.apply(q, k, v, ring=ring)
    both = RingAttention.apply(q, k, v, ring=ring, with_lse=True)
    return both[..., :Dv], both[..., Dv]
