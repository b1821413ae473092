"""Linear attention on the CPU with numba: a two-rung ladder, O(N * D * Dv), no atomics.

The maths is in docs/linear-attention.md and in ``linear_reference.py`` (the oracle these
kernels are tested against). In short, with ``q' = phi(q)``, ``k' = phi(k)``,
``phi(x) = elu(x) + 1``::

    out_i = (q'_i^T S_i) / (q'_i . z_i + eps),   S_i = sum_{j seen by i} k'_j v_j^T,
                                                 z_i = sum_{j seen by i} k'_j

Shape legend: see ``spec.py``. Per head: ``qf (Nq, D)``, ``kf (Nk, D)``, ``v (Nk, Dv)``,
state ``S (D, Dv)``, ``z (D,)``; a chunk holds ``C`` queries and at most ``C`` keys.

Which keys a query sees is folded into one integer, ``diag``: query ``i`` sees keys
``j < i + diag + 1``, i.e. ``diag = offset = Nk - Nq`` when causal, and ``diag = Nk`` when not
(then every query sees every key, and the chunked code below has no diagonal work at all:
non-causal is the causal algorithm with everything in the prefix state).

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

Parallel over (batch, query head) with ``prange``; each head is one sequential scan, so
results are bit-identical over reruns. The GQA reduction of dk, dv (a sum over the
``group`` query heads of one kv head) happens afterwards in NumPy, in a fixed order. No
``fastmath`` here (the shared ``exp_sub`` carries its own explicit flag set, without
``nnan``/``ninf``).
"""

from __future__ import annotations

import numpy as np

from ..spec import LinearSpec

# _compile: NUMBA_ERROR, prange, the threading layer choice (workqueue unless the user set
# NUMBA_THREADING_LAYER), blas_single_threaded() and a vectorisable exp_sub, shared with
# the flash kernels.
from ._compile import NUMBA_ERROR, blas_single_threaded, exp_sub, prange

if NUMBA_ERROR is None:
    from numba import njit
else:  # the reference backend still works without numba; this module must still import

    def njit(*args, **kwargs):
        return lambda fn: fn

CHUNK = 64  # queries (and at most this many keys) per chunk of the fast rung


def unavailable_reason() -> str | None:
    """None when the numba kernels can run here, else why not (numba or scipy missing)."""
    return NUMBA_ERROR


# -- helpers compiled once, used by both rungs --------------------------------------------------


@njit(cache=True)
def _phi(x):
    """phi(x) = elu(x) + 1 on a 2-D array: x + 1 (x > 0), exp(x) (x <= 0).

    ``exp_sub`` (from ``_compile``) is an exp the compiler vectorises for float32 (libm's
    exp is a scalar call, and was 70% of the forward's time); float64 uses libm.
    """
    out = np.empty_like(x)
    zeros = np.zeros(x.shape[1], dtype=x.dtype)
    for r in range(x.shape[0]):
        row = out[r]
        for d in range(x.shape[1]):
            row[d] = min(x[r, d], 0)
        exp_sub(row, zeros)  # row = exp(row - 0)
        for d in range(x.shape[1]):
            row[d] = x[r, d] + 1 if x[r, d] > 0 else row[d]
    return out


@njit(cache=True)
def _times_phi_grad(g, x, xf):
    """g *= phi'(x) in place, from x and xf = phi(x): phi'(x) = 1 (x > 0), exp(x) = phi(x) (x <= 0)."""
    for r in range(x.shape[0]):
        for d in range(x.shape[1]):
            if x[r, d] <= 0:
                g[r, d] *= xf[r, d]


@njit(cache=True)
def _keys_seen(i, diag, Nk):
    """Query i sees keys [0, _keys_seen(i)): j <= i + diag, clipped to [0, Nk]."""
    return min(max(i + diag + 1, 0), Nk)


@njit(cache=True)
def _chunk_keys(i0, i1, diag, Nk):
    """Keys [js, je) on the diagonal of the query chunk [i0, i1).

    Keys before js are seen by every query of the chunk (they are in the carried state);
    keys in [js, je) are seen by some of its queries: query i sees key j iff j <= i + diag.
    Worked example: diag = 0, chunk [64, 128): js, je = 64, 128, and query 70 sees keys
    64..70 of the diagonal block. Non-causal (diag = Nk): js = je = Nk, no diagonal block.
    """
    return min(max(i0 + diag, 0), Nk), min(max(i1 + diag, 0), Nk)


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
def _mask_diagonal(block, i0, js, diag):
    """Zero block[r, t] (query i0 + r, key js + t) where the query may not see the key."""
    for r in range(block.shape[0]):
        for t in range(max(i0 + r + diag + 1 - js, 0), block.shape[1]):
            block[r, t] = 0


# -- rung 1: the recurrent form, plain loops ---------------------------------------------------


@njit(cache=True)
def _forward_head_loops(q, k, v, diag, eps, out):
    """One head: q (Nq, D), k (Nk, D), v (Nk, Dv) -> out (Nq, Dv), written in place."""
    Nq, D = q.shape
    Nk, Dv = v.shape
    qf, kf = _phi(q), _phi(k)
    S = np.zeros((D, Dv), dtype=q.dtype)
    z = np.zeros(D, dtype=q.dtype)
    added = 0  # keys [0, added) are in S, z
    for i in range(Nq):
        for j in range(added, _keys_seen(i, diag, Nk)):  # S += k'_j v_j^T, z += k'_j
            for d in range(D):
                z[d] += kf[j, d]
                for e in range(Dv):
                    S[d, e] += kf[j, d] * v[j, e]
        added = max(added, _keys_seen(i, diag, Nk))
        den = eps
        for d in range(D):
            den += qf[i, d] * z[d]
        for e in range(Dv):
            num = q.dtype.type(0)
            for d in range(D):
                num += qf[i, d] * S[d, e]
            out[i, e] = num / den


@njit(cache=True)
def _backward_head_loops(q, k, v, out, dout, diag, eps, dq, dk, dv):
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
        for j in range(added, _keys_seen(i, diag, Nk)):
            for d in range(D):
                z[d] += kf[j, d]
                for e in range(Dv):
                    S[d, e] += kf[j, d] * v[j, e]
        added = max(added, _keys_seen(i, diag, Nk))
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
    # grow as j falls, because query i sees j iff i >= j - diag
    G = np.zeros_like(S)  # (D, Dv)
    g = np.zeros(D, dtype=q.dtype)
    first = Nq  # queries [first, Nq) are in G, g
    for j in range(Nk - 1, -1, -1):
        new_first = min(max(j - diag, 0), Nq)
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
def _forward_head_chunked(q, k, v, diag, eps, chunk, out):
    """One head, chunked: q (Nq, D), k (Nk, D), v (Nk, Dv) -> out (Nq, Dv), written in place."""
    Nq = q.shape[0]
    Nk = k.shape[0]
    qf, kf = _phi(q), _phi(k)
    # the state starts with the keys every query sees (all of them when not causal)
    js0 = _chunk_keys(0, 0, diag, Nk)[0]
    S = np.dot(kf[:js0].T, v[:js0])  # (D, Dv)
    z = kf[:js0].sum(axis=0)  # (D,)
    for i0 in range(0, Nq, chunk):
        i1 = min(i0 + chunk, Nq)
        js, je = _chunk_keys(i0, i1, diag, Nk)
        qc = qf[i0:i1]  # (c, D)
        num = np.dot(qc, S)  # (c, Dv): the keys before the chunk
        den = np.dot(qc, z) + eps  # (c,)
        if je > js:  # the diagonal block, quadratic in the chunk
            kc, vc = kf[js:je], v[js:je]  # (L, D), (L, Dv)
            scores = np.dot(qc, kc.T)  # (c, L)
            _mask_diagonal(scores, i0, js, diag)
            num += np.dot(scores, vc)
            den += _row_sums(scores)
            S += np.dot(kc.T, vc)  # carry the chunk's keys forward
            z += kc.sum(axis=0)
        out[i0:i1] = num / den.reshape((-1, 1))


@njit(cache=True)
def _backward_head_chunked(q, k, v, out, dout, diag, eps, chunk, dq, dk, dv):
    """One head's dq (Nq, D), dk (Nk, D), dv (Nk, Dv), chunked (dk, dv not GQA-summed)."""
    Nq = q.shape[0]
    Nk = k.shape[0]
    qf, kf = _phi(q), _phi(k)
    a = np.empty_like(dout)  # (Nq, Dv) dnum_i
    c = np.empty(Nq, dtype=q.dtype)  # (Nq,) dden_i
    # pass 1, chunks in order: dq, with the running state S, z of the forward
    js0 = _chunk_keys(0, 0, diag, Nk)[0]
    S = np.dot(kf[:js0].T, v[:js0])  # (D, Dv)
    z = kf[:js0].sum(axis=0)  # (D,)
    for i0 in range(0, Nq, chunk):
        i1 = min(i0 + chunk, Nq)
        js, je = _chunk_keys(i0, i1, diag, Nk)
        qc = qf[i0:i1]
        kc, vc = kf[js:je], v[js:je]
        scores = np.dot(qc, kc.T)  # (c, L), recomputed
        _mask_diagonal(scores, i0, js, diag)
        den = np.dot(qc, z) + _row_sums(scores) + eps  # (c,)
        # 1. forward: out_i = num_i / den_i
        #    -> a_i = dout_i / den_i,  c_i = -(dout_i . out_i) / den_i
        ac = dout[i0:i1] / den.reshape((-1, 1))
        cc = -_row_dots(dout[i0:i1], out[i0:i1]) / den
        a[i0:i1] = ac
        c[i0:i1] = cc
        # 2. forward: num_i = q'_i^T S_i + sum_{j in chunk} scores_ij v_j,  den_i = q'_i . z_i + ...
        #    -> dq'_i = S_i a_i + c_i z_i + sum_{j in chunk} (a_i . v_j + c_i) k'_j
        dqc = np.dot(ac, S.T) + cc.reshape((-1, 1)) * z.reshape((1, -1))
        if je > js:
            dscores = np.dot(ac, vc.T) + cc.reshape((-1, 1))  # (c, L)
            _mask_diagonal(dscores, i0, js, diag)
            dqc += np.dot(dscores, kc)
            S += np.dot(kc.T, vc)
            z += kc.sum(axis=0)
        dq[i0:i1] = dqc
    # 3. forward: q' = phi(q)  ->  dq = dq' * elu'(q)
    _times_phi_grad(dq, q, qf)
    # pass 2, chunks in reverse: dk, dv, carrying G = sum q'_i a_i^T (D, Dv) and
    # g = sum c_i q'_i (D,) over the queries after the chunk
    G = np.zeros_like(S)  # (D, Dv)
    g = np.zeros_like(z)  # (D,)
    for i0 in range(((Nq - 1) // chunk) * chunk, -1, -chunk):
        i1 = min(i0 + chunk, Nq)
        js, je = _chunk_keys(i0, i1, diag, Nk)
        qc, ac, cc = qf[i0:i1], a[i0:i1], c[i0:i1]
        if je > js:
            kc, vc = kf[js:je], v[js:je]
            # 4. forward: S = sum_j k'_j v_j^T, z = sum_j k'_j (later queries: G, g; this chunk: masked)
            #    -> dk'_j = G_j v_j + g_j,   dv_j = G_j^T k'_j
            scores = np.dot(qc, kc.T)
            _mask_diagonal(scores, i0, js, diag)
            dscores = np.dot(ac, vc.T) + cc.reshape((-1, 1))
            _mask_diagonal(dscores, i0, js, diag)
            dk[js:je] = np.dot(vc, G.T) + g.reshape((1, -1)) + np.dot(dscores.T, qc)
            dv[js:je] = np.dot(kc, G) + np.dot(scores.T, ac)
        G += np.dot(qc.T, ac)
        g += np.dot(qc.T, cc)
    # the keys every query sees: all of G, g
    dk[:js0] = np.dot(v[:js0], G.T) + g.reshape((1, -1))
    dv[:js0] = np.dot(kf[:js0], G)
    # 5. forward: k' = phi(k)  ->  dk = dk' * elu'(k)
    _times_phi_grad(dk, k, kf)


# -- parallel drivers: one prange over (batch, query head) per call ---------------------------


@njit(parallel=True, cache=True)
def _forward_all(q, k, v, diag, eps, chunk, out):
    """chunk > 0: rung 2 with that chunk size; chunk == 0: rung 1 (loops)."""
    B, Hq = q.shape[0], q.shape[1]
    group = Hq // k.shape[1]
    for bh in prange(B * Hq):
        b, h = bh // Hq, bh % Hq
        if chunk > 0:
            _forward_head_chunked(q[b, h], k[b, h // group], v[b, h // group], diag, eps, chunk, out[b, h])
        else:
            _forward_head_loops(q[b, h], k[b, h // group], v[b, h // group], diag, eps, out[b, h])


@njit(parallel=True, cache=True)
def _backward_all(q, k, v, out, dout, diag, eps, chunk, dq, dk_per_q, dv_per_q):
    """dk_per_q (B, Hq, Nk, D), dv_per_q (B, Hq, Nk, Dv): one slot per query head, no races."""
    B, Hq = q.shape[0], q.shape[1]
    group = Hq // k.shape[1]
    for bh in prange(B * Hq):
        b, h = bh // Hq, bh % Hq
        kv = h // group
        if chunk > 0:
            _backward_head_chunked(q[b, h], k[b, kv], v[b, kv], out[b, h], dout[b, h], diag, eps,
                                   chunk, dq[b, h], dk_per_q[b, h], dv_per_q[b, h])
        else:
            _backward_head_loops(q[b, h], k[b, kv], v[b, kv], out[b, h], dout[b, h], diag, eps,
                                 dq[b, h], dk_per_q[b, h], dv_per_q[b, h])


# -- the protocol ---------------------------------------------------------------------------


def _diag(spec: LinearSpec) -> int:
    """Query i sees keys j <= i + diag: offset when causal, Nk (everything) when not."""
    return spec.offset if spec.causal else spec.Nk


def _contiguous(spec: LinearSpec, *arrays):
    return [np.ascontiguousarray(a, dtype=spec.dtype) for a in arrays]


def _check_chunk(chunk) -> int:
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


def _run_forward(q, k, v, spec: LinearSpec, chunk: int) -> np.ndarray:
    q, k, v = _contiguous(spec, q, k, v)
    out = np.empty((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
    with blas_single_threaded():  # each prange worker owns a core; OpenBLAS must not spawn more
        _forward_all(q, k, v, _diag(spec), spec.dtype.type(spec.eps), chunk, out)
    return out


def _run_backward(q, k, v, out, dout, spec: LinearSpec, chunk: int):
    q, k, v, out, dout = _contiguous(spec, q, k, v, out, dout)
    dq = np.empty_like(q)
    dk_per_q = np.empty((spec.B, spec.Hq, spec.Nk, spec.D), dtype=spec.dtype)
    dv_per_q = np.empty((spec.B, spec.Hq, spec.Nk, spec.Dv), dtype=spec.dtype)
    with blas_single_threaded():
        _backward_all(q, k, v, out, dout, _diag(spec), spec.dtype.type(spec.eps), chunk,
                      dq, dk_per_q, dv_per_q)
    if spec.group == 1:
        return dq, dk_per_q, dv_per_q
    # GQA: each kv head served `group` query heads, so its gradient is their sum
    B, Hkv, group, Nk = spec.B, spec.Hkv, spec.group, spec.Nk
    dk = dk_per_q.reshape(B, Hkv, group, Nk, spec.D).sum(axis=2)  # (B, Hkv, group, Nk, D)
    dv = dv_per_q.reshape(B, Hkv, group, Nk, spec.Dv).sum(axis=2)  # (B, Hkv, group, Nk, Dv)
    return dq, dk, dv


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
