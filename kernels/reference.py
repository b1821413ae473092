"""The NumPy reference: scores materialised, backward written by hand.

This is the oracle every fast kernel is checked against, so it is written for clarity:
one einsum per line of maths, the (B, Hq, Nq, Nk) score tensor in memory, no tiling.
The derivation of the backward is in docs/attention-backward.md.

Shape legend: see ``spec.py``. ``s``/``p`` below are (B, Hq, Nq, Nk); ``stats`` is
(2, B, Hq, Nq): the row shift ``m`` and the row sum ``l`` (``protocol.py``).

Scores are built in the one order (``masking.py``): ``scale * q . k``, then the softcap
(``masking.cap_and_slope``), then the ALiBi term (``masking.alibi_bias``) and the bias,
then -inf outside the band: every rule applied to whole arrays.
"""

from __future__ import annotations

import numpy as np

from . import mods
from .masking import alibi_bias, cap_and_slope, in_band, keep, row_shift
from .spec import AttentionSpec

SUPPORTS_MODS = True  # mask_mod / score_mod evaluated on arrays (mods.py)


def expand_kv(x: np.ndarray, group: int) -> np.ndarray:
    """(B, Hkv, Nk, X) -> (B, Hq, Nk, X): query head h reads kv head h // group (GQA).

    The one GQA rule; linear attention's reference and kernels use it too."""
    return np.repeat(x, group, axis=1)


def reduce_kv(dx: np.ndarray, group: int) -> np.ndarray:
    """(B, Hq, Nk, X) -> (B, Hkv, Nk, X): the adjoint of expand_kv sums each group."""
    B, Hq, Nk, X = dx.shape
    return dx.reshape(B, Hq // group, group, Nk, X).sum(axis=2)  # (B, Hkv, group, Nk, X)


def allowed_pairs(spec: AttentionSpec) -> np.ndarray:
    """(Bm, Hm, Nq, Nk) bool: the band, the mask and mask_mod all allow query i to see key j
    ((B, Hq, Nq, Nk) with a mask_mod)."""
    i = np.arange(spec.Nq)[:, None]
    j = np.arange(spec.Nk)[None, :]
    allowed = in_band(spec.band, i, j)[None, None]
    if spec.has_bias:
        allowed = allowed & (spec.bias > -np.inf)
    if spec.mask_mod is not None:
        allowed = allowed & mods.mask_array(spec)
    return allowed


def dropout_multiplier(spec: AttentionSpec) -> np.ndarray | None:
    """(B, Hq, Nq, Nk) keep / (1 - p), or None without dropout."""
    if spec.dropout_p == 0.0:
        return None
    b, h, i, j = np.ix_(np.arange(spec.B), np.arange(spec.Hq), np.arange(spec.Nq), np.arange(spec.Nk))
    kept = keep(spec.pack().dropout, b, h, i, j)
    return kept.astype(spec.dtype) * spec.dtype.type(spec.dropout_scale)


def score_terms(q, k, spec: AttentionSpec, need_slope: bool = True):
    """(s, slope): the scores (B, Hq, Nq, Nk) -- capped, through score_mod, + ALiBi, biased,
    every forbidden pair at -inf -- and d s / d (scale q . k) of the same shape, the
    softcap's slope times score_mod_grad, 0 on forbidden pairs (None without softcap and
    score_mod, or when ``need_slope`` is False)."""
    packed = spec.pack()
    s = np.einsum("bhid,bhjd->bhij", q, expand_kv(k, spec.group)) * spec.dtype.type(spec.scale)
    slope = None
    if spec.has_softcap:
        s, slope = cap_and_slope(packed.reals, s)
    mod_slope = None
    if spec.score_mod is not None:  # score_mod sees the capped score
        if need_slope:
            mod_slope = mods.score_mod_slope(spec, s)
        s = mods.score_mod_array(spec, s)
    if spec.has_alibi:
        b, h, i, j = np.ix_(*(np.arange(n) for n in (spec.B, spec.Hq, spec.Nq, spec.Nk)))
        s = s + alibi_bias(packed.alibi, packed.band, b, h, i, j)
    if spec.has_bias:
        s = s + spec.bias
    allowed = allowed_pairs(spec)
    if mod_slope is not None:
        slope = mod_slope if slope is None else slope * mod_slope
        slope = np.where(allowed, slope, 0).astype(spec.dtype, copy=False)
    return np.where(allowed, s, -np.inf).astype(spec.dtype, copy=False), (slope if need_slope else None)


def scores(q, k, spec: AttentionSpec) -> np.ndarray:
    """Scaled, capped, modded, biased scores with every forbidden pair at -inf: (B, Hq, Nq, Nk)."""
    return score_terms(q, k, spec, need_slope=False)[0]


def row_stats(s) -> np.ndarray:
    """stats (2, B, Hq, Nq): the row max m (-inf on a row that allows no key) and
    l = sum_j exp(s_ij - m_i) (0 on such a row), as every kernel stores them."""
    m = s.max(axis=-1)  # (B, Hq, Nq)
    m_safe = np.where(m == -np.inf, 0, m).astype(s.dtype)  # row-max subtraction: no overflow
    l = np.exp(s - m_safe[..., None]).sum(axis=-1)
    return np.stack([m, l]).astype(s.dtype, copy=False)


def probabilities(s, stats) -> np.ndarray:
    """p = exp(s - m) / l through ``masking.row_shift`` (the one rule every backend uses):
    exact where exp(s - lse) is not, and all zero on rows that allow no key."""
    with np.errstate(invalid="ignore"):  # a NaN statistic (NaN input) stays NaN, quietly
        shift, norm = np.vectorize(row_shift, otypes=[s.dtype, s.dtype])(stats[0], stats[1])
    return np.exp(s - shift[..., None]) / norm[..., None]


def forward(q, k, v, spec: AttentionSpec):
    """out (B, Hq, Nq, Dv), stats (2, B, Hq, Nq) for q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)."""
    s = scores(q, k, spec)  # (B, Hq, Nq, Nk)
    stats = row_stats(s)
    p = probabilities(s, stats)
    z = dropout_multiplier(spec)
    if z is not None:
        p = p * z
    out = np.einsum("bhij,bhjd->bhid", p, expand_kv(v, spec.group))
    return out.astype(spec.dtype, copy=False), stats


# The backward's steps (docs/attention-backward.md), one line of maths each, for every head
# at once: k, v, dk, dv here are per query head, (B, Hq, Nk, X) (expand_kv / reduce_kv).


def value_grads(p, v, dout):
    """forward: out = p @ v  ->  dv = p^T @ dout (B, Hq, Nk, Dv), dp = dout @ v^T (B, Hq, Nq, Nk).

    p (B, Hq, Nq, Nk), v (B, Hq, Nk, Dv), dout (B, Hq, Nq, Dv)."""
    dv = np.einsum("bhij,bhid->bhjd", p, dout)
    dp = np.einsum("bhid,bhjd->bhij", dout, v)
    return dv, dp


def row_delta(out, dout):
    """delta (B, Hq, Nq): delta_i = sum_j p_ij dp_ij, in its cheap form sum_d out_id dout_id
    (out = p @ v, so both are dout_i . sum_j p_ij v_j): no sum over the Nk keys."""
    return np.einsum("bhid,bhid->bhi", out, dout)


def score_grads(p, dp, delta):
    """forward: p = softmax(s) row by row  ->  ds = p * (dp - delta) (B, Hq, Nq, Nk),
    delta (B, Hq, Nq) subtracted from its own row. p == 0 on a forbidden pair: ds is 0 there."""
    return p * (dp - delta[..., None])


def query_key_grads(ds, q, k, scale):
    """forward: x = scale * q @ k^T  ->  dq = scale * ds @ k (B, Hq, Nq, D),
    dk = scale * ds^T @ q (B, Hq, Nk, D)."""
    dq = np.einsum("bhij,bhjd->bhid", ds, k) * scale
    dk = np.einsum("bhij,bhid->bhjd", ds, q) * scale
    return dq, dk


def backward(q, k, v, out, stats, dout, spec: AttentionSpec, dlse=None):
    """dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv) from dout (B, Hq, Nq, Dv)
    and dlse (B, Hq, Nq), the gradient reaching lse (None: lse was not used)."""
    k_all, v_all = expand_kv(k, spec.group), expand_kv(v, spec.group)  # (B, Hq, Nk, D), (B, Hq, Nk, Dv)
    scale = spec.dtype.type(spec.scale)
    if spec.score_mod is not None and spec.score_mod_grad is None:
        raise ValueError(mods.MISSING_GRAD)
    # forward: p = exp(s - m) / l, recomputed instead of stored
    s, slope = score_terms(q, k, spec)
    p = probabilities(s, stats)
    # forward: p_drop = p * z   (z = keep / (1 - p_dropout), or 1)
    z = dropout_multiplier(spec)
    p_drop = p if z is None else p * z
    # 1. forward: out = p_drop @ v  ->  dv = p_drop^T @ dout, dp_drop = dout @ v^T
    dv_all, dp = value_grads(p_drop, v_all, dout)
    # 2. forward: p_drop = p * z  ->  dp = dp_drop * z
    if z is not None:
        dp = dp * z
    # 3. forward: p = softmax(s)  ->  ds = p * (dp - delta),
    #    delta_i = sum_j p_ij dp_ij = sum_d out_id dout_id (the cheap form, no Nk sum)
    delta = row_delta(out, dout)
    # 3'. forward: lse = log(sum_j exp(s_j))  ->  ds += p * dlse   (p undropped: lse has no
    #     dropout), folded into delta: ds = p * (dp - (delta - dlse))
    if dlse is not None:
        delta = delta - dlse
    ds = score_grads(p, dp, delta)
    # 4. forward: s = score_mod(cap(x)) + alibi + bias, x = scale * q @ k^T
    #    ->  dx = ds * score_mod_grad(cap(x)) * cap'(x)
    if slope is not None:
        ds = ds * slope
    # 5. forward: x = scale * q @ k^T  ->  dq = scale * dx @ k, dk = scale * dx^T @ q
    dq, dk_all = query_key_grads(ds, q, k_all, scale)
    # 6. GQA: each kv head served `group` query heads, so its gradient is their sum
    dk, dv = reduce_kv(dk_all, spec.group), reduce_kv(dv_all, spec.group)
    return (dq.astype(spec.dtype, copy=False), dk.astype(spec.dtype, copy=False),
            dv.astype(spec.dtype, copy=False))
