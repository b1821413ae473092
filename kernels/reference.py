"""The NumPy reference: scores materialised, backward written by hand.

This is the oracle every fast kernel is checked against, so it is written for clarity:
one einsum per line of maths, the (B, Hq, Nq, Nk) score tensor in memory, no tiling.
The derivation of the backward is in docs/attention-backward.md.

Shape legend: see ``spec.py``. ``s``/``p`` below are (B, Hq, Nq, Nk).
"""

from __future__ import annotations

import numpy as np

from .masking import in_band, keep
from .spec import AttentionSpec


def expand_kv(x: np.ndarray, spec: AttentionSpec) -> np.ndarray:
    """(B, Hkv, Nk, X) -> (B, Hq, Nk, X): query head h reads kv head h // group."""
    return np.repeat(x, spec.group, axis=1)


def reduce_kv(dx: np.ndarray, spec: AttentionSpec) -> np.ndarray:
    """(B, Hq, Nk, X) -> (B, Hkv, Nk, X): the adjoint of expand_kv sums each group."""
    B, Hq, Nk, X = dx.shape
    return dx.reshape(B, spec.Hkv, spec.group, Nk, X).sum(axis=2)  # (B, Hkv, group, Nk, X)


def allowed_pairs(spec: AttentionSpec) -> np.ndarray:
    """(Bm, Hm, Nq, Nk) bool: the band and the mask both allow query i to see key j."""
    i = np.arange(spec.Nq)[:, None]
    j = np.arange(spec.Nk)[None, :]
    allowed = in_band(i, j, spec.offset, spec.window_left, spec.window_right)[None, None]
    if spec.has_bias:
        allowed = allowed & (spec.bias > -np.inf)
    return allowed


def dropout_multiplier(spec: AttentionSpec) -> np.ndarray | None:
    """(B, Hq, Nq, Nk) keep / (1 - p), or None without dropout."""
    if spec.dropout_p == 0.0:
        return None
    b, h, i, j = np.ix_(np.arange(spec.B), np.arange(spec.Hq), np.arange(spec.Nq), np.arange(spec.Nk))
    kept = keep(spec.seed_lo, spec.seed_hi, b, h, i, j, spec.dropout_threshold)
    return kept.astype(spec.dtype) * spec.dtype.type(spec.dropout_scale)


def scores(q, k, spec: AttentionSpec) -> np.ndarray:
    """Scaled, biased scores with every forbidden pair at -inf: (B, Hq, Nq, Nk)."""
    s = np.einsum("bhid,bhjd->bhij", q, expand_kv(k, spec)) * spec.dtype.type(spec.scale)
    if spec.has_bias:
        s = s + spec.bias
    return np.where(allowed_pairs(spec), s, -np.inf).astype(spec.dtype, copy=False)


def probabilities(s, lse) -> np.ndarray:
    """p = exp(s - lse), with rows that allow no key (lse = -inf) all zero, never NaN."""
    lse_safe = np.where(lse == -np.inf, np.inf, lse)  # exp(-inf - inf) = 0 on empty rows
    return np.exp(s - lse_safe[..., None])


def forward(q, k, v, spec: AttentionSpec):
    """out (B, Hq, Nq, Dv), lse (B, Hq, Nq) for q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)."""
    s = scores(q, k, spec)  # (B, Hq, Nq, Nk)
    m = s.max(axis=-1)  # (B, Hq, Nq), -inf on rows that allow no key
    m_safe = np.where(m == -np.inf, 0, m).astype(spec.dtype)  # row-max subtraction: no overflow
    e = np.exp(s - m_safe[..., None])
    l = e.sum(axis=-1)
    with np.errstate(divide="ignore"):
        lse = (m_safe + np.log(l)).astype(spec.dtype)  # log(0) = -inf on empty rows
    p = probabilities(s, lse)
    z = dropout_multiplier(spec)
    if z is not None:
        p = p * z
    out = np.einsum("bhij,bhjd->bhid", p, expand_kv(v, spec))
    return out.astype(spec.dtype, copy=False), lse


def backward(q, k, v, out, lse, dout, spec: AttentionSpec):
    """dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv) from dout (B, Hq, Nq, Dv)."""
    k_all, v_all = expand_kv(k, spec), expand_kv(v, spec)  # (B, Hq, Nk, D), (B, Hq, Nk, Dv)
    scale = spec.dtype.type(spec.scale)
    # forward: p = exp(s - lse), recomputed instead of stored
    p = probabilities(scores(q, k, spec), lse)
    # forward: p_drop = p * z   (z = keep / (1 - p_dropout), or 1)
    z = dropout_multiplier(spec)
    p_drop = p if z is None else p * z
    # 1. forward: out = p_drop @ v  ->  dv = p_drop^T @ dout, dp_drop = dout @ v^T
    dv_all = np.einsum("bhij,bhid->bhjd", p_drop, dout)
    dp = np.einsum("bhid,bhjd->bhij", dout, v_all)
    # 2. forward: p_drop = p * z  ->  dp = dp_drop * z
    if z is not None:
        dp = dp * z
    # 3. forward: p = softmax(s)  ->  ds = p * (dp - delta),
    #    delta_i = sum_j p_ij dp_ij = sum_d out_id dout_id (the cheap form, no Nk sum)
    delta = np.einsum("bhid,bhid->bhi", out, dout)
    ds = p * (dp - delta[..., None])
    # 4. forward: s = scale * q @ k^T + bias  ->  dq = scale * ds @ k, dk = scale * ds^T @ q
    dq = np.einsum("bhij,bhjd->bhid", ds, k_all) * scale
    dk_all = np.einsum("bhij,bhid->bhjd", ds, q) * scale
    # 5. GQA: each kv head served `group` query heads, so its gradient is their sum
    dk, dv = reduce_kv(dk_all, spec), reduce_kv(dv_all, spec)
    return (dq.astype(spec.dtype, copy=False), dk.astype(spec.dtype, copy=False),
            dv.astype(spec.dtype, copy=False))
