"""Linear attention on the CPU with numba: a two-rung ladder, O(N * D * Dv), no atomics.

The maths is in docs/linear-attention.md and in ``linear_reference.py`` (the oracle these
kernels are tested against). In short, with ``q' = phi(q)``, ``k' = phi(k)``,
``phi(x) = elu(x) + 1``::

    out_i = (q'_i^T S_i) / (q'_i . z_i + eps),   S_i = sum_{j seen by i} k'_j v_j^T,
                                                 z_i = sum_{j seen by i} k'_j

Shape legend: see ``spec.py``. Per head: ``qf (Nq, D)``, ``kf (Nk, D)``, ``v (Nk, Dv)``,
state ``S (D, Dv)``, ``z (D,)``; a chunk holds ``C`` queries and at most ``C`` keys.

Which keys a query sees is the spec's band record (``LinearSpec.band``), read only through
the rules of ``masking.py`` (``key_range``, ``query_range``, compiled once for every CPU
kernel in ``_compile`` by ``compile.compile_rules``): causal ``(offset, -1, 0)``, query
``i`` seeing keys ``j <= i + offset``; non-causal ``(offset, -1, -1)``, every key (then the
chunked code below has no diagonal work at all: non-causal is the causal algorithm with
everything in the prefix state). With no left edge, the keys a query sees are a prefix ``[0, _keys_end(i))``
and the queries that see a key a suffix ``[_queries_start(j), Nq)``.

The ladder (both validated against ``linear_reference`` in tests/kernels/test_linear.py).
Measured with ``python benchmarks/linear_scaling.py [--rung loops]``: float32, B=1, H=8,
D=Dv=64, N=4096, causal, median wall time (process CPU time of both threads in brackets)
on a shared 2-core VM, threading layer ``workqueue``:

    rung 1  forward_loops / backward_loops: the recurrent form. One query at a time; the
            state grows by rank-1 updates as keys come into view; the backward runs the
            same recurrence forward for dq and backwards (over keys) for dk, dv.
            Plain loops, no BLAS.              fwd 224 ms (111)   fwd+bwd 868 ms (428)
    rung 2  forward / backward (the default): chunked. Inside a chunk of C queries the
            diagonal block is done quadratically with np.dot on (C, C) tiles, masked by
            hand; the state S, z is carried between chunks and updated with one
            (D, C) @ (C, Dv) product per chunk. Same O(N * D * Dv), every product in
            BLAS.                              fwd  90 ms  (56)   fwd+bwd 339 ms (210)

Only 2-2.5x apart: at D = Dv = 64 the (64, 64) tiles keep OpenBLAS at ~25 GFLOP/s per
core, and numba vectorises rung 1's inner loops well. Wall times on this VM vary by up
to 2x with other jobs' load; the CPU times are steadier.

Parallel over (batch, query head): contiguous ranges of heads go to ``numba.get_num_threads()``
threads, each running a serial ``nogil`` driver (not a ``prange``, which compiled several
times slower, see the drivers below); each head is one sequential scan, so results are
bit-identical over reruns and whatever the split. The GQA reduction of dk, dv (a sum over
the ``group`` query heads of one kv head) happens afterwards in ``reference.reduce_kv``, in a
fixed order; the drivers read kv head ``h // group`` for query head ``h``. No
``fastmath`` here except in ``_exp_inplace`` (the flag set of ``_compile.FASTMATH``,
without ``nnan``/``ninf``).

Cold compile (empty cache, float32, causal, first forward then first backward, 2-core VM
under load): fwd ~9 s, bwd ~7 s; it was ~29 s and ~58 s. The savings: no array expressions,
slice assignments or ``sum(axis=0)`` in the chunked kernels (numba compiles each to a
function of its own; ``sum(axis=0)`` alone took ~4 s, the backward's slice assignments ~9 s),
no ``prange`` drivers, one driver per rung, and ``fast_exp`` called directly rather than
through the ``inline="always"`` ``exp_sub``.
"""

from __future__ import annotations

import numpy as np

from ..reference import reduce_kv
from ..spec import LinearSpec

# _compile: NUMBA_ERROR, FASTMATH, blas_single_threaded(), the vectorisable fast_exp and
# masking.py's band rules, shared with the flash kernels.
from ._compile import FASTMATH, NUMBA_ERROR, blas_single_threaded, fast_exp, key_range, query_range

if NUMBA_ERROR is None:
    import numba
    from numba import njit
else:  # the reference backend still works without numba; this module must still import

    def njit(*args, **kwargs):
        return lambda fn: fn

CHUNK = 64  # queries (and at most this many keys) per chunk of the fast rung


def unavailable_reason() -> str | None:
    """None when the numba kernels can run here, else why not (numba or scipy missing)."""
    return NUMBA_ERROR


# -- helpers compiled once, used by both rungs --------------------------------------------------


@njit(cache=True, fastmath=FASTMATH)
def _exp_inplace(x):
    """x = exp(x) in place over a C-contiguous array, with ``fast_exp`` from ``_compile``.

    The same sweep (and the same fastmath flags, no ``nnan``/``ninf``) as ``_compile.exp_sub``
    with a zero shift, but an ordinary call, not an ``inline="always"`` one: numba's IR-level
    inlining of that sweep into ``_phi`` was slow to compile and raised a
    ``NumbaIRAssumptionWarning`` about variable scopes. LLVM still inlines and vectorises it.
    """
    flat = x.reshape(x.size)
    for t in range(flat.shape[0]):
        flat[t] = fast_exp(flat[t])


@njit(cache=True)
def _phi(x):
    """phi(x) = elu(x) + 1 on a 2-D array: x + 1 (x > 0), exp(x) (x <= 0).

    ``fast_exp`` (from ``_compile``) is an exp the compiler vectorises for float32 (libm's
    exp is a scalar call, and was 70% of the forward's time); float64 uses libm.
    """
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for d in range(x.shape[1]):
            out[r, d] = min(x[r, d], 0)
    _exp_inplace(out)
    for r in range(x.shape[0]):
        for d in range(x.shape[1]):
            out[r, d] = x[r, d] + 1 if x[r, d] > 0 else out[r, d]
    return out


@njit(cache=True)
def _times_phi_grad(g, x, xf):
    """g *= phi'(x) in place, from x and xf = phi(x): phi'(x) = 1 (x > 0), exp(x) = phi(x) (x <= 0)."""
    for r in range(x.shape[0]):
        for d in range(x.shape[1]):
            if x[r, d] <= 0:
                g[r, d] *= xf[r, d]


@njit(cache=True)
def _keys_end(band, i, Nk):
    """Query i sees keys [0, _keys_end(band, i, Nk)) (masking.key_range; the band has no
    left edge, so they are a prefix). Causal: j <= i + offset, clipped to [0, Nk].

    ``i = -1`` is a virtual query just before the first: causal with offset > 0 it sees keys
    [0, offset), the keys every real query sees.
    """
    return key_range(band, i, i + 1, Nk)[1]


@njit(cache=True)
def _queries_start(band, j, Nq):
    """Key j is seen by queries [_queries_start(band, j, Nq), Nq) (masking.query_range, a
    suffix). Causal: i >= j - offset, clipped to [0, Nq]."""
    return query_range(band, j, j + 1, Nq)[0]


@njit(cache=True)
def _chunk_keys(band, i0, i1, Nk):
    """Keys [js, je) on the diagonal of the query chunk [i0, i1).

    Keys before js, those query i0 - 1 sees, are in the state carried into the chunk (and
    every query of the chunk sees them); keys in [js, je) are seen by some of its queries,
    je being where the chunk's last query stops. So the diagonal blocks of consecutive
    chunks tile the keys. Worked example: causal, offset 0, chunk [64, 128): js, je = 64,
    128, and query 70 sees keys 64..70 of the diagonal block. Non-causal: js = je = Nk, no
    diagonal block.
    """
    return _keys_end(band, i0 - 1, Nk), _keys_end(band, i1 - 1, Nk)


@njit(cache=True)
def _row_sums(x):
    """x.sum(axis=1) for a 2-D array (numba's own axis=1 sum was 7x slower than this loop)."""
    out = np.zeros(x.shape[0], dtype=x.dtype)
    for r in range(x.shape[0]):
        for t in range(x.shape[1]):
            out[r] += x[r, t]
    return out


@njit(cache=True)
def _row_dots(x, y):
    """(x * y).sum(axis=1) for two 2-D arrays of one shape, without the temporary."""
    out = np.zeros(x.shape[0], dtype=x.dtype)
    for r in range(x.shape[0]):
        for t in range(x.shape[1]):
            out[r] += x[r, t] * y[r, t]
    return out


@njit(cache=True)
def _col_sums(x):
    """x.sum(axis=0) for a 2-D array, rows added in order (numba's own axis=0 sum took ~4 s
    to compile, a third of the whole forward's cold compile)."""
    out = np.zeros(x.shape[1], dtype=x.dtype)
    for r in range(x.shape[0]):
        for t in range(x.shape[1]):
            out[t] += x[r, t]
    return out


@njit(cache=True)
def _copy(a, b):
    """a[...] = b for two C-contiguous arrays of one shape (numba's slice assignment
    compiled several times slower)."""
    af, bf = a.reshape(a.size), b.reshape(b.size)
    for t in range(af.shape[0]):
        af[t] = bf[t]


@njit(cache=True)
def _add(a, b):
    """a += b in place for two C-contiguous arrays of one shape (an explicit loop compiles
    faster than numba's in-place ufunc, which is specialised per shape and layout)."""
    af, bf = a.reshape(a.size), b.reshape(b.size)
    for t in range(af.shape[0]):
        af[t] += bf[t]


@njit(cache=True)
def _mask_diagonal(block, band, i0, js, Nk):
    """Zero block[r, t] (query i0 + r, key js + t) where the query may not see the key."""
    for r in range(block.shape[0]):
        for t in range(max(_keys_end(band, i0 + r, Nk) - js, 0), block.shape[1]):
            block[r, t] = 0


# -- rung 1: the recurrent form, plain loops ---------------------------------------------------


@njit(cache=True)
def _forward_head_loops(q, k, v, band, eps, out):
    """One head: q (Nq, D), k (Nk, D), v (Nk, Dv) -> out (Nq, Dv), written in place."""
    Nq, D = q.shape
    Nk, Dv = v.shape
    qf, kf = _phi(q), _phi(k)
    S = np.zeros((D, Dv), dtype=q.dtype)
    z = np.zeros(D, dtype=q.dtype)
    added = 0  # keys [0, added) are in S, z
    for i in range(Nq):
        seen = _keys_end(band, i, Nk)
        for j in range(added, seen):  # S += k'_j v_j^T, z += k'_j
            for d in range(D):
                z[d] += kf[j, d]
                for e in range(Dv):
                    S[d, e] += kf[j, d] * v[j, e]
        added = max(added, seen)
        den = eps
        for d in range(D):
            den += qf[i, d] * z[d]
        for e in range(Dv):
            num = q.dtype.type(0)
            for d in range(D):
                num += qf[i, d] * S[d, e]
            out[i, e] = num / den


@njit(cache=True)
def _backward_head_loops(q, k, v, out, dout, band, eps, dq, dk, dv):
    """One head's dq (Nq, D), dk (Nk, D), dv (Nk, Dv), written in place (dk, dv not GQA-summed)."""
    Nq, D = q.shape
    Nk, Dv = v.shape
    qf, kf = _phi(q), _phi(k)
    a = np.empty((Nq, Dv), dtype=q.dtype)  # dnum_i
    c = np.empty(Nq, dtype=q.dtype)  # dden_i
    # pass 1, queries in order: recompute S_i, z_i, den_i as the forward did
    S = np.zeros((D, Dv), dtype=q.dtype)
    z = np.zeros(D, dtype=q.dtype)
    added = 0
    for i in range(Nq):
        seen = _keys_end(band, i, Nk)
        for j in range(added, seen):
            for d in range(D):
                z[d] += kf[j, d]
                for e in range(Dv):
                    S[d, e] += kf[j, d] * v[j, e]
        added = max(added, seen)
        den = eps
        for d in range(D):
            den += qf[i, d] * z[d]
        # forward: out_i = num_i / den_i  ->  a_i = dout_i / den_i, c_i = -(dout_i . out_i) / den_i
        dot = q.dtype.type(0)
        for e in range(Dv):
            a[i, e] = dout[i, e] / den
            dot += dout[i, e] * out[i, e]
        c[i] = -dot / den
        # forward: num_i = q'_i^T S_i, den_i = q'_i . z_i + eps  ->  dq'_i = S_i a_i + c_i z_i
        for d in range(D):
            acc = c[i] * z[d]
            for e in range(Dv):
                acc += S[d, e] * a[i, e]
            dq[i, d] = acc
    # forward: q' = phi(q)  ->  dq = dq' * elu'(q)
    _times_phi_grad(dq, q, qf)
    # pass 2, keys in reverse: G_j = sum_{i sees j} q'_i a_i^T, g_j = sum_{i sees j} c_i q'_i
    # grow as j falls, because the queries that see key j are a suffix [first(j), Nq)
    G = np.zeros_like(S)  # (D, Dv)
    g = np.zeros(D, dtype=q.dtype)
    first = Nq  # queries [first, Nq) are in G, g
    for j in range(Nk - 1, -1, -1):
        new_first = _queries_start(band, j, Nq)
        for i in range(new_first, first):
            for d in range(D):
                g[d] += c[i] * qf[i, d]
                for e in range(Dv):
                    G[d, e] += qf[i, d] * a[i, e]
        first = min(first, new_first)
        # forward: S_i = sum_j k'_j v_j^T, z_i = sum_j k'_j  ->  dk'_j = G_j v_j + g_j, dv_j = G_j^T k'_j
        for d in range(D):
            acc = g[d]
            for e in range(Dv):
                acc += G[d, e] * v[j, e]
            dk[j, d] = acc
        for e in range(Dv):
            acc = q.dtype.type(0)
            for d in range(D):
                acc += G[d, e] * kf[j, d]
            dv[j, e] = acc
    # forward: k' = phi(k)  ->  dk = dk' * elu'(k)
    _times_phi_grad(dk, k, kf)


# -- rung 2: chunked, BLAS on tiles ----------------------------------------------------------


@njit(cache=True)
def _forward_head_chunked(q, k, v, band, eps, chunk, out):
    """One head, chunked: q (Nq, D), k (Nk, D), v (Nk, Dv) -> out (Nq, Dv), written in place.

    Element-wise steps are written as loops: numba compiles each array expression and each
    broadcast to a function of its own, and those dominated the cold compile.
    """
    Nq = q.shape[0]
    Nk = k.shape[0]
    qf, kf = _phi(q), _phi(k)
    # the state starts with the keys every query sees (all of them when not causal)
    js0 = _keys_end(band, -1, Nk)
    S = np.dot(kf[:js0].T, v[:js0])  # (D, Dv)
    z = _col_sums(kf[:js0])  # (D,)
    for i0 in range(0, Nq, chunk):
        i1 = min(i0 + chunk, Nq)
        js, je = _chunk_keys(band, i0, i1, Nk)
        qc = qf[i0:i1]  # (c, D)
        num = np.dot(qc, S)  # (c, Dv): the keys before the chunk
        den = np.dot(qc, z)  # (c,)
        for r in range(den.shape[0]):
            den[r] += eps
        if je > js:  # the diagonal block, quadratic in the chunk
            kc, vc = kf[js:je], v[js:je]  # (L, D), (L, Dv)
            scores = np.dot(qc, kc.T)  # (c, L)
            _mask_diagonal(scores, band, i0, js, Nk)
            _add(num, np.dot(scores, vc))
            _add(den, _row_sums(scores))
            _add(S, np.dot(kc.T, vc))  # carry the chunk's keys forward
            _add(z, _col_sums(kc))
        for r in range(i1 - i0):  # out_i = num_i / den_i
            for e in range(num.shape[1]):
                out[i0 + r, e] = num[r, e] / den[r]


@njit(cache=True)
def _backward_head_chunked(q, k, v, out, dout, band, eps, chunk, dq, dk, dv):
    """One head's dq (Nq, D), dk (Nk, D), dv (Nk, Dv), chunked (dk, dv not GQA-summed)."""
    Nq = q.shape[0]
    Nk = k.shape[0]
    D, Dv = q.shape[1], v.shape[1]
    qf, kf = _phi(q), _phi(k)
    a = np.empty_like(dout)  # (Nq, Dv) dnum_i
    c = np.empty(Nq, dtype=q.dtype)  # (Nq,) dden_i
    # pass 1, chunks in order: dq, with the running state S, z of the forward
    js0 = _keys_end(band, -1, Nk)
    S = np.dot(kf[:js0].T, v[:js0])  # (D, Dv)
    z = _col_sums(kf[:js0])  # (D,)
    for i0 in range(0, Nq, chunk):
        i1 = min(i0 + chunk, Nq)
        js, je = _chunk_keys(band, i0, i1, Nk)
        qc = qf[i0:i1]
        kc, vc = kf[js:je], v[js:je]
        scores = np.dot(qc, kc.T)  # (c, L), recomputed
        _mask_diagonal(scores, band, i0, js, Nk)
        den = np.dot(qc, z)  # (c,)
        _add(den, _row_sums(scores))
        dots = _row_dots(dout[i0:i1], out[i0:i1])
        # 1. forward: out_i = num_i / den_i
        #    -> a_i = dout_i / den_i,  c_i = -(dout_i . out_i) / den_i
        for r in range(i1 - i0):
            den[r] += eps
            for e in range(Dv):
                a[i0 + r, e] = dout[i0 + r, e] / den[r]
            c[i0 + r] = -dots[r] / den[r]
        ac, cc = a[i0:i1], c[i0:i1]
        # 2. forward: num_i = q'_i^T S_i + sum_{j in chunk} scores_ij v_j,  den_i = q'_i . z_i + ...
        #    -> dq'_i = S_i a_i + c_i z_i + sum_{j in chunk} (a_i . v_j + c_i) k'_j
        dqc = np.dot(ac, S.T)
        for r in range(i1 - i0):
            for d in range(D):
                dqc[r, d] += cc[r] * z[d]
        if je > js:
            dscores = np.dot(ac, vc.T)  # (c, L)
            for r in range(i1 - i0):
                for t in range(je - js):
                    dscores[r, t] += cc[r]
            _mask_diagonal(dscores, band, i0, js, Nk)
            _add(dqc, np.dot(dscores, kc))
            _add(S, np.dot(kc.T, vc))
            _add(z, _col_sums(kc))
        _copy(dq[i0:i1], dqc)
    # 3. forward: q' = phi(q)  ->  dq = dq' * elu'(q)
    _times_phi_grad(dq, q, qf)
    # pass 2, chunks in reverse: dk, dv, carrying G = sum q'_i a_i^T (D, Dv) and
    # g = sum c_i q'_i (D,) over the queries after the chunk
    G = np.zeros_like(S)  # (D, Dv)
    g = np.zeros_like(z)  # (D,)
    for i0 in range(((Nq - 1) // chunk) * chunk, -1, -chunk):
        i1 = min(i0 + chunk, Nq)
        js, je = _chunk_keys(band, i0, i1, Nk)
        qc, ac, cc = qf[i0:i1], a[i0:i1], c[i0:i1]
        if je > js:
            kc, vc = kf[js:je], v[js:je]
            # 4. forward: S = sum_j k'_j v_j^T, z = sum_j k'_j (later queries: G, g; this chunk: masked)
            #    -> dk'_j = G_j v_j + g_j,   dv_j = G_j^T k'_j
            scores = np.dot(qc, kc.T)
            _mask_diagonal(scores, band, i0, js, Nk)
            dscores = np.dot(ac, vc.T)
            for r in range(i1 - i0):
                for t in range(je - js):
                    dscores[r, t] += cc[r]
            _mask_diagonal(dscores, band, i0, js, Nk)
            dkc = np.dot(vc, G.T)
            for t in range(je - js):
                for d in range(D):
                    dkc[t, d] += g[d]
            _add(dkc, np.dot(dscores.T, qc))
            _copy(dk[js:je], dkc)
            dvc = np.dot(kc, G)
            _add(dvc, np.dot(scores.T, ac))
            _copy(dv[js:je], dvc)
        _add(G, np.dot(qc.T, ac))
        _add(g, np.dot(qc.T, cc))
    # the keys every query sees: all of G, g
    _copy(dk[:js0], np.dot(v[:js0], G.T))
    for t in range(js0):
        for d in range(D):
            dk[t, d] += g[d]
    _copy(dv[:js0], np.dot(kf[:js0], G))
    # 5. forward: k' = phi(k)  ->  dk = dk' * elu'(k)
    _times_phi_grad(dk, k, kf)


# -- drivers: the (batch, query head) grid, split over threads --------------------------------

# Each driver runs the heads [start, stop) = ``heads`` of the grid, serially and without the
# GIL; _over_heads hands contiguous ranges of heads to a thread pool. A ``parallel=True``
# driver with a ``prange`` did the same but was slow to compile: numba links every head
# kernel it reaches into the parfor's gufunc and re-optimises it there (measured: 3.4 s for
# the forward's driver, 14 s for the backward's, against 1 s and 3 s for these). One driver
# per rung, so the default rung never compiles rung 1. Query head h reads kv head h // group
# (GQA, as reference.expand_kv); dk, dv get one slot per query head, summed afterwards.


@njit(cache=True, nogil=True)
def _forward_heads_chunked(q, k, v, band, eps, chunk, out, heads):
    Hq = q.shape[1]
    group = Hq // k.shape[1]
    for bh in range(heads[0], heads[1]):
        b, h = bh // Hq, bh % Hq
        _forward_head_chunked(q[b, h], k[b, h // group], v[b, h // group], band, eps, chunk, out[b, h])


@njit(cache=True, nogil=True)
def _forward_heads_loops(q, k, v, band, eps, out, heads):
    Hq = q.shape[1]
    group = Hq // k.shape[1]
    for bh in range(heads[0], heads[1]):
        b, h = bh // Hq, bh % Hq
        _forward_head_loops(q[b, h], k[b, h // group], v[b, h // group], band, eps, out[b, h])


@njit(cache=True, nogil=True)
def _backward_heads_chunked(q, k, v, out, dout, band, eps, chunk, dq, dk_per_q, dv_per_q, heads):
    """dk_per_q (B, Hq, Nk, D), dv_per_q (B, Hq, Nk, Dv): one slot per query head, no races."""
    Hq = q.shape[1]
    group = Hq // k.shape[1]
    for bh in range(heads[0], heads[1]):
        b, h = bh // Hq, bh % Hq
        kv = h // group
        _backward_head_chunked(q[b, h], k[b, kv], v[b, kv], out[b, h], dout[b, h], band, eps,
                               chunk, dq[b, h], dk_per_q[b, h], dv_per_q[b, h])


@njit(cache=True, nogil=True)
def _backward_heads_loops(q, k, v, out, dout, band, eps, dq, dk_per_q, dv_per_q, heads):
    Hq = q.shape[1]
    group = Hq // k.shape[1]
    for bh in range(heads[0], heads[1]):
        b, h = bh // Hq, bh % Hq
        kv = h // group
        _backward_head_loops(q[b, h], k[b, kv], v[b, kv], out[b, h], dout[b, h], band, eps,
                             dq[b, h], dk_per_q[b, h], dv_per_q[b, h])


_POOL: list = []  # [ThreadPoolExecutor], created on first use


def _over_heads(driver, n_heads: int, *args) -> None:
    """driver(*args, (start, stop)) over the n_heads heads, on numba.get_num_threads() threads.

    Each head is one sequential scan wherever it runs, so results do not depend on the split.
    """
    threads = min(numba.get_num_threads(), n_heads)
    if threads <= 1:
        driver(*args, (0, n_heads))
        return
    if not _POOL or _POOL[0]._max_workers < threads:
        from concurrent.futures import ThreadPoolExecutor

        _POOL[:] = [ThreadPoolExecutor(threads, thread_name_prefix="microattn-linear")]
    bounds = [n_heads * t // threads for t in range(threads + 1)]
    jobs = [_POOL[0].submit(driver, *args, (bounds[t], bounds[t + 1])) for t in range(1, threads)]
    driver(*args, (bounds[0], bounds[1]))  # this thread takes the first range
    for job in jobs:
        job.result()


# -- the protocol ---------------------------------------------------------------------------


def _contiguous(spec: LinearSpec, *arrays):
    return [np.ascontiguousarray(a, dtype=spec.dtype) for a in arrays]


def _check_chunk(chunk) -> int:
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


def _run_forward(q, k, v, spec: LinearSpec, chunk: int) -> np.ndarray:
    """Rung 2 with ``chunk`` queries per chunk, or rung 1 (chunk 0)."""
    q, k, v = _contiguous(spec, q, k, v)
    out = np.empty((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
    heads, band, eps = spec.B * spec.Hq, spec.band, spec.dtype.type(spec.eps)
    with blas_single_threaded():  # each of our threads owns a core; OpenBLAS must not spawn more
        if chunk > 0:
            _over_heads(_forward_heads_chunked, heads, q, k, v, band, eps, chunk, out)
        else:
            _over_heads(_forward_heads_loops, heads, q, k, v, band, eps, out)
    return out


def _run_backward(q, k, v, out, dout, spec: LinearSpec, chunk: int):
    """Rung 2 with ``chunk`` queries per chunk, or rung 1 (chunk 0)."""
    q, k, v, out, dout = _contiguous(spec, q, k, v, out, dout)
    dq = np.empty_like(q)
    dk_per_q = np.empty((spec.B, spec.Hq, spec.Nk, spec.D), dtype=spec.dtype)
    dv_per_q = np.empty((spec.B, spec.Hq, spec.Nk, spec.Dv), dtype=spec.dtype)
    heads, band, eps = spec.B * spec.Hq, spec.band, spec.dtype.type(spec.eps)
    with blas_single_threaded():
        if chunk > 0:
            _over_heads(_backward_heads_chunked, heads, q, k, v, out, dout, band, eps, chunk,
                        dq, dk_per_q, dv_per_q)
        else:
            _over_heads(_backward_heads_loops, heads, q, k, v, out, dout, band, eps,
                        dq, dk_per_q, dv_per_q)
    if spec.group == 1:  # one query head per kv head: the slots are the gradients
        return dq, dk_per_q, dv_per_q
    # GQA: each kv head served `group` query heads, so its gradient is their sum
    return dq, reduce_kv(dk_per_q, spec.group), reduce_kv(dv_per_q, spec.group)


def forward(q, k, v, spec: LinearSpec, *, chunk: int = CHUNK) -> np.ndarray:
    """out (B, Hq, Nq, Dv) for q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); rung 2."""
    return _run_forward(q, k, v, spec, _check_chunk(chunk))


def backward(q, k, v, out, dout, spec: LinearSpec, *, chunk: int = CHUNK):
    """dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv) from dout; rung 2."""
    return _run_backward(q, k, v, out, dout, spec, _check_chunk(chunk))


def forward_loops(q, k, v, spec: LinearSpec) -> np.ndarray:
    """Rung 1 of the ladder (the recurrent form): same result as forward, slower."""
    return _run_forward(q, k, v, spec, 0)


def backward_loops(q, k, v, out, dout, spec: LinearSpec):
    """Rung 1 of the ladder: same result as backward, slower."""
    return _run_backward(q, k, v, out, dout, spec, 0)
