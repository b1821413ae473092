"""Linear attention in NumPy, backward written by hand: the oracle for ``cpu/linear.py``.

Shape legend: see ``spec.py``. Here ``q' = phi(q)`` and ``k' = phi(k)`` are the features,
``S`` is a (D, Dv) key-value state and ``z`` a (D,) key normaliser::

    phi(x) = elu(x) + 1 = x + 1 (x > 0), exp(x) (x <= 0)        always > 0
    S_i    = sum_{j seen by i} k'_j v_j^T                         (D, Dv)
    z_i    = sum_{j seen by i} k'_j                               (D,)
    num_i  = q'_i^T S_i                                           (Dv,)
    den_i  = q'_i . z_i + eps                                     scalar
    out_i  = num_i / den_i

Query ``i`` sees key ``j`` where ``masking.in_band(spec.band, i, j)``: every key, or
(causal, bottom-right aligned) keys ``j <= i + offset`` with ``offset = Nk - Nq``. A query
that sees no key has ``S_i = 0, z_i = 0``, so ``out_i = 0 / eps = 0`` and every gradient
through it is 0: nothing turns into NaN.

Non-causal, ``S`` and ``z`` are one sum over all keys: O(N * D * Dv) time, O(D * Dv)
memory. Causal, every query needs its own prefix state, which this reference builds with a
cumulative sum over keys of the outer products ``k'_j v_j^T``: still O(N * D * Dv) time, but
also O(N * D * Dv) *memory* ((B, Hkv, Nk + 1, D, Dv) states; the backward holds a
(B, Hq, Nq + 1, D, Dv) one). That is fine for an oracle on test sizes and is exactly what
the chunked numba kernel avoids (it carries one running state). The maths, chunked form
included, is in docs/linear-attention.md.
"""

from __future__ import annotations

import numpy as np

from .masking import in_band
from .reference import expand_kv, reduce_kv
from .spec import LinearSpec


# -- helpers: one job each -----------------------------------------------------------------


def feature_map(x: np.ndarray) -> np.ndarray:
    """phi(x) = elu(x) + 1: x + 1 for x > 0, exp(x) for x <= 0 (always positive)."""
    return np.where(x > 0, x + 1, np.exp(np.minimum(x, 0)))  # minimum: no overflow warning


def feature_map_grad(x: np.ndarray) -> np.ndarray:
    """phi'(x) = elu'(x): 1 for x > 0, exp(x) for x <= 0."""
    return np.where(x > 0, np.ones_like(x), np.exp(np.minimum(x, 0)))


def allowed_pairs(spec: LinearSpec) -> np.ndarray:
    """(Nq, Nk) bool: query i may see key j (``masking.in_band`` on the spec's band)."""
    return in_band(spec.band, np.arange(spec.Nq)[:, None], np.arange(spec.Nk)[None, :])


def keys_seen(spec: LinearSpec) -> np.ndarray:
    """(Nq,) int: query i sees keys [0, keys_seen[i]).

    The band (``spec.band``, ``masking.in_band``) has no left edge, so the keys a query
    sees are a prefix and their count is where it ends.

    Worked example: Nq = 3, Nk = 5, causal (offset 2): query 0 sees keys 0..2, so
    keys_seen == [3, 4, 5]. With Nq = 5, Nk = 3 (offset -2): [0, 0, 1, 2, 3], the first two
    queries see nothing. Non-causal: every entry is Nk.
    """
    return allowed_pairs(spec).sum(axis=1)


def queries_seeing(spec: LinearSpec) -> np.ndarray:
    """(Nk,) int: key j is seen by queries [queries_seeing[j], Nq) (the transpose of keys_seen).

    Causal: query i sees key j iff j <= i + offset iff i >= j - offset, a suffix of queries.
    """
    return spec.Nq - allowed_pairs(spec).sum(axis=0)


def prefix_states(kf, v, spec: LinearSpec):
    """Per-query states S (B, Hq, Nq, D, Dv) and z (B, Hq, Nq, D): sums over the keys each sees.

    Non-causal all queries share one state; causal uses an exclusive cumulative sum over keys
    (index t holds keys [0, t)), which costs O(Nk * D * Dv) memory.
    """
    if not spec.causal:
        S = np.einsum("bhjd,bhje->bhde", kf, v)  # (B, Hkv, D, Dv)
        z = kf.sum(axis=2)  # (B, Hkv, D)
        S_q = np.broadcast_to(expand_kv(S, spec.group)[:, :, None], (spec.B, spec.Hq, spec.Nq, spec.D, spec.Dv))
        z_q = np.broadcast_to(expand_kv(z, spec.group)[:, :, None], (spec.B, spec.Hq, spec.Nq, spec.D))
        return S_q, z_q
    B, Hkv, Nk, D, Dv = spec.B, spec.Hkv, spec.Nk, spec.D, spec.Dv
    S_cum = np.zeros((B, Hkv, Nk + 1, D, Dv), dtype=kf.dtype)
    np.cumsum(np.einsum("bhjd,bhje->bhjde", kf, v), axis=2, out=S_cum[:, :, 1:])
    z_cum = np.zeros((B, Hkv, Nk + 1, D), dtype=kf.dtype)
    np.cumsum(kf, axis=2, out=z_cum[:, :, 1:])
    seen = keys_seen(spec)  # query i reads prefix index seen[i]
    return expand_kv(S_cum[:, :, seen], spec.group), expand_kv(z_cum[:, :, seen], spec.group)


def suffix_states(qf, a, c, spec: LinearSpec):
    """The backward's mirror of prefix_states, per key and per query head.

    G_j = sum_{i sees j} q'_i a_i^T  (B, Hq, Nk, D, Dv) and g_j = sum_{i sees j} c_i q'_i
    (B, Hq, Nk, D); causal uses an exclusive cumulative sum over queries taken from the end.
    """
    if not spec.causal:
        G = np.einsum("bhid,bhie->bhde", qf, a)  # (B, Hq, D, Dv)
        g = np.einsum("bhid,bhi->bhd", qf, c)  # (B, Hq, D)
        Nk = spec.Nk
        return (np.broadcast_to(G[:, :, None], G.shape[:2] + (Nk,) + G.shape[2:]),
                np.broadcast_to(g[:, :, None], g.shape[:2] + (Nk,) + g.shape[2:]))
    B, Hq, Nq, D, Dv = spec.B, spec.Hq, spec.Nq, spec.D, spec.Dv
    # index t holds queries [t, Nq): reverse, cumulative sum, reverse back
    G_suf = np.zeros((B, Hq, Nq + 1, D, Dv), dtype=qf.dtype)
    G_suf[:, :, :Nq] = np.cumsum(np.einsum("bhid,bhie->bhide", qf, a)[:, :, ::-1], axis=2)[:, :, ::-1]
    g_suf = np.zeros((B, Hq, Nq + 1, D), dtype=qf.dtype)
    g_suf[:, :, :Nq] = np.cumsum((qf * c[..., None])[:, :, ::-1], axis=2)[:, :, ::-1]
    first = queries_seeing(spec)  # key j reads suffix index first[j]
    return G_suf[:, :, first], g_suf[:, :, first]


# -- the two entry points ------------------------------------------------------------------


def forward(q, k, v, spec: LinearSpec) -> np.ndarray:
    """out (B, Hq, Nq, Dv) for q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)."""
    eps = spec.dtype.type(spec.eps)
    qf, kf = feature_map(q), feature_map(k)  # (B, Hq, Nq, D), (B, Hkv, Nk, D)
    S, z = prefix_states(kf, v, spec)  # (B, Hq, Nq, D, Dv), (B, Hq, Nq, D)
    num = np.einsum("bhid,bhide->bhie", qf, S)  # (B, Hq, Nq, Dv)
    den = np.einsum("bhid,bhid->bhi", qf, z) + eps  # (B, Hq, Nq)
    out = num / den[..., None]
    return out.astype(spec.dtype, copy=False)


def backward(q, k, v, out, dout, spec: LinearSpec):
    """dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv) from dout (B, Hq, Nq, Dv)."""
    eps = spec.dtype.type(spec.eps)
    qf, kf = feature_map(q), feature_map(k)
    S, z = prefix_states(kf, v, spec)
    den = np.einsum("bhid,bhid->bhi", qf, z) + eps  # recomputed: (B, Hq, Nq)
    # 1. forward: out_i = num_i / den_i
    #    -> a_i = dnum_i = dout_i / den_i,   c_i = dden_i = -(dout_i . num_i) / den_i^2
    #                                                      = -(dout_i . out_i) / den_i
    a = dout / den[..., None]  # (B, Hq, Nq, Dv)
    c = -np.einsum("bhie,bhie->bhi", dout, out) / den  # (B, Hq, Nq)
    # 2. forward: num_i = q'_i^T S_i,  den_i = q'_i . z_i + eps
    #    -> dq'_i = S_i a_i + c_i z_i
    dqf = np.einsum("bhide,bhie->bhid", S, a) + c[..., None] * z
    # 3. forward: S_i = sum_{j seen by i} k'_j v_j^T,  z_i = sum_{j seen by i} k'_j
    #    -> with G_j = sum_{i sees j} q'_i a_i^T and g_j = sum_{i sees j} c_i q'_i:
    #       dk'_j = G_j v_j + g_j,   dv_j = G_j^T k'_j   (per query head, then summed)
    G, g = suffix_states(qf, a, c, spec)  # (B, Hq, Nk, D, Dv), (B, Hq, Nk, D)
    v_q, kf_q = expand_kv(v, spec.group), expand_kv(kf, spec.group)
    dkf_q = np.einsum("bhjde,bhje->bhjd", G, v_q) + g
    dv_q = np.einsum("bhjde,bhjd->bhje", G, kf_q)
    # 4. forward: q' = phi(q), k' = phi(k), phi(x) = elu(x) + 1
    #    -> dq = dq' * elu'(q), elu'(x) = 1 (x > 0), exp(x) (x <= 0); likewise dk
    dq = dqf * feature_map_grad(q)
    # 5. GQA: each kv head served `group` query heads, so its gradient is their sum
    dk = reduce_kv(dkf_q, spec.group) * feature_map_grad(k)
    dv = reduce_kv(dv_q, spec.group)
    return (dq.astype(spec.dtype, copy=False), dk.astype(spec.dtype, copy=False),
            dv.astype(spec.dtype, copy=False))
