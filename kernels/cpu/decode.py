"""Attention for a few queries against a long cache: the decoding step (Nq = 1..16).

The flash kernel (``flash.py``) is built for prefill: 128 x 256 tiles, and K and V copied
into transposed tile buffers. A decoding step has one query (or a few: several sequences'
worth of draft tokens) against thousands of cached keys, so its work is reading K and V
once. This kernel reads them **in place**, from a view of a preallocated cache
(``k[:, :, :n]`` of a ``(B, Hkv, capacity, D)`` buffer, ``nn.KVCache``): nothing is copied,
so a step costs one read of the n cached keys and values and nothing else.

Shape legend (see ``spec.py``)::

    q (B, Hq, Nq, D)   k (B, Hkv, Nk, D)   v (B, Hkv, Nk, Dv)   out (B, Hq, Nq, Dv)
    stats (2, B, Hq, Nq): the row shift m and the row sum l (``protocol.py``)
    k and v may be prefix views k[:, :, :Nk] of (B, Hkv, capacity, D) buffers: read in place

One task per (b, kv head, key split): the group's query heads and their queries (``group *
Nq`` rows) against that kv head's keys, so K and V are read once per kv head, not once per
query head. Per row (query head h, query i), over the keys the band allows
(``key_range(band, i, i + 1, Nk)``, cut to the split's keys)::

    pass 1:  s_j = cap(scale * q_i . k_j) + alibi + bias,   m = max_j s_j   (masking.py's rules)
    pass 2:  p_j = exp(s_j - shift),  l = sum_j p_j,  acc = sum_j p_j z_j v_j
             (shift = m, or 0 on a row with no key: masking.row_shift's rule; z dropout)

**Split-KV.** Each split leaves a partial ``(m, l, acc)`` per row; ``_merge`` rescales the
partials to the largest m and sums them (the same merge as ``merge_attention_states``), then
divides by l. Today ``forward`` uses one split (``splits=1``): the heads of one step already
give both cores work. Splitting the keys of a long cache across cores when there are fewer
heads than cores is the attention-features issue's (pass ``splits > 1``; tested already).

The backward delegates to the reference (decoding is inference; the protocol wants one).
"""

from __future__ import annotations

import types

import numpy as np

from .. import masking, reference
from ..compile import compile_rules
from ..spec import AttentionSpec
from ._compile import (
    FASTMATH,
    NUMBA_ERROR,
    PARALLEL,
    fast_exp,
    fast_tanh,
    numba,
    prange,
)

MAX_QUERIES = 16  # the Nq this kernel is meant for (it is correct for any Nq)
PARALLEL_WORK = 1 << 12  # (rows x keys) below which the step runs on the calling thread

if numba is not None:
    rules = compile_rules(numba.njit(fastmath=FASTMATH, error_model="numpy"),
                          replace={masking.tanh: fast_tanh})
    key_range, has_bias = rules.key_range, rules.has_bias
    bias_index, keep, has_dropout = rules.bias_index, rules.keep, rules.has_dropout
    row_shift = rules.row_shift
    has_softcap, cap, has_alibi, alibi_bias = (
        rules.has_softcap, rules.cap, rules.has_alibi, rules.alibi_bias)


def unavailable_reason() -> str | None:
    return NUMBA_ERROR


# -- the protocol -----------------------------------------------------------------------


def forward(q, k, v, spec: AttentionSpec, splits: int = 1):
    """out (B, Hq, Nq, Dv), stats (2, B, Hq, Nq); k and v are read where they lie."""
    q = np.ascontiguousarray(q, dtype=spec.dtype)
    k_rows, v_rows = _cache_rows(k, spec.dtype), _cache_rows(v, spec.dtype)
    packed = spec.pack()
    m_part = np.empty((splits, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)
    l_part = np.empty_like(m_part)
    acc_part = np.empty((splits, spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
    work = spec.B * spec.Hq * spec.Nq * spec.Nk
    step = _decode_parallel if work >= PARALLEL_WORK else _decode_serial
    step(q, k_rows, v_rows, spec.Nk, *packed, splits, m_part, l_part, acc_part)
    out = np.empty((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
    stats = np.empty((2, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)
    _merge_compiled(m_part, l_part, acc_part, out, stats)
    return out, stats


def backward(q, k, v, out, stats, dout, spec: AttentionSpec):
    """The reference's backward (decoding is inference: correct, not fast), on the row
    statistics of the reference's own scores: this kernel's dot products round differently,
    and at large logits exp magnifies that (float32, scores ~1e3: 6e-5 in dv)."""
    stats = reference.row_stats(reference.scores(q, k, spec))
    return reference.backward(q, k, v, out, stats, dout, spec)


def _cache_rows(x, dtype):
    """x (B, H, N, X) as a C-contiguous (B, H, capacity, X) array whose first N rows along
    axis 2 are x's: x itself when contiguous, or, without a copy, the cache buffer x is a
    prefix view of (``x = buffer[:, :, :N]``, as ``nn.KVCache`` hands them out). The
    kernel reads only those N rows. Anything else is copied, as any kernel would.

    Why not read the view itself: numba compiles a strided view's row loops with a stride
    multiply and does not vectorise them (measured: the step ran 2-3x slower).
    """
    if x.dtype == dtype and x.flags.c_contiguous:
        return x
    buffer = x.base
    if (isinstance(buffer, np.ndarray) and buffer.dtype == dtype and buffer.ndim == 4
            and buffer.flags.c_contiguous and buffer.strides == x.strides
            and buffer.shape[:2] == x.shape[:2] and buffer.shape[3] == x.shape[3]
            and buffer.__array_interface__["data"][0] == x.__array_interface__["data"][0]):
        return buffer  # same first element and strides: x is buffer[:, :, :N]
    return np.ascontiguousarray(x, dtype=dtype)


# -- merging the splits -------------------------------------------------------------------


def _merge(m_part, l_part, acc_part, out, stats):
    """Partials (splits, B, Hq, Nq[, Dv]) -> out (B, Hq, Nq, Dv), stats (2, B, Hq, Nq):
    rescale each split to the row's largest m, sum, divide by the norm of
    ``masking.row_shift`` (+inf on a row that saw no key: out 0; NaN stays NaN)."""
    splits, B, Hq, Nq, Dv = acc_part.shape
    t = out.dtype.type
    for b in range(B):
        for h in range(Hq):
            for i in range(Nq):
                m = m_part[0, b, h, i]
                for split in range(1, splits):
                    m = m_part[split, b, h, i] if m_part[split, b, h, i] > m else m
                shift = t(0) if m == -np.inf else m
                out_row = out[b, h, i]
                out_row[:] = t(0)
                l = t(0)
                for split in range(splits):
                    m_split = m_part[split, b, h, i]
                    alpha = t(1) if m_split == m else fast_exp(m_split - shift)
                    l += alpha * l_part[split, b, h, i]
                    acc = acc_part[split, b, h, i]
                    for e in range(Dv):
                        out_row[e] += alpha * acc[e]
                stats[0, b, h, i], stats[1, b, h, i] = m, l
                norm = row_shift(m, l)[1]
                for e in range(Dv):
                    out_row[e] /= norm


# -- the step ---------------------------------------------------------------------------


def _decode(q, k, v, Nk, bias, band, dropout, reals, alibi, splits, m_part, l_part, acc_part):
    B, Hq, Nq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]  # k, v (B, Hkv, capacity, D/Dv): rows >= Nk unread
    group = Hq // Hkv
    t = q.dtype.type
    scale, dropout_scale = reals[0], reals[1]
    use_bias, use_dropout = has_bias(bias), has_dropout(dropout)
    use_cap, use_alibi = has_softcap(reals), has_alibi(alibi)
    for task in prange(B * Hkv * splits):
        b, kv_head, split = task // (Hkv * splits), (task // splits) % Hkv, task % splits
        split_start, split_stop = split * Nk // splits, (split + 1) * Nk // splits
        scores = np.empty(split_stop - split_start, dtype=q.dtype)
        acc = np.empty(Dv, dtype=q.dtype)
        for h in range(kv_head * group, (kv_head + 1) * group):
            bb, hh = bias_index(bias, b, h)
            for i in range(Nq):
                j_start, j_stop = key_range(band, i, i + 1, Nk)  # one row: exactly its keys
                j_start, j_stop = max(j_start, split_start), min(j_stop, split_stop)
                q_row = q[b, h, i]
                # pass 1: scores and their max
                m = t(-np.inf)
                for j in range(j_start, j_stop):
                    k_row = k[b, kv_head, j]
                    dot = t(0)
                    for d in range(D):
                        dot += q_row[d] * k_row[d]
                    scores[j - split_start] = dot * scale
                if use_cap:  # the score's terms in masking.py's order: cap, ALiBi, bias
                    for j in range(j_start, j_stop):
                        scores[j - split_start] = cap(reals, scores[j - split_start])
                if use_alibi:
                    for j in range(j_start, j_stop):
                        scores[j - split_start] += alibi_bias(alibi, band, b, h, i, j)
                if use_bias:
                    for j in range(j_start, j_stop):
                        scores[j - split_start] += bias[bb, hh, i, j]
                for j in range(j_start, j_stop):
                    s = scores[j - split_start]
                    m = s if s > m else m
                # pass 2: p = exp(s - shift) and its sum, then the weighted sum of values
                shift = t(0) if m == -np.inf else m
                l = t(0)
                for j in range(j_start, j_stop):
                    p = fast_exp(scores[j - split_start] - shift)
                    l += p
                    scores[j - split_start] = p
                if use_dropout:
                    for j in range(j_start, j_stop):
                        kept = keep(dropout, b, h, i, j)
                        scores[j - split_start] *= dropout_scale if kept else t(0)
                for e in range(Dv):
                    acc[e] = t(0)
                for j in range(j_start, j_stop):
                    p = scores[j - split_start]
                    v_row = v[b, kv_head, j]
                    for e in range(Dv):
                        acc[e] += p * v_row[e]
                m_part[split, b, h, i], l_part[split, b, h, i] = m, l
                for e in range(Dv):
                    acc_part[split, b, h, i, e] = acc[e]


def _compile_twice(fn):
    """(parallel, serial): waking the worker threads costs ~10-30 us on a 2-core machine,
    more than a short cache's whole step. The serial twin gets a cache file of its own."""
    if numba is None:
        return fn, fn
    options = dict(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
    serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)
    serial.__qualname__ = fn.__qualname__ + "_serial"
    return numba.njit(parallel=PARALLEL, **options)(fn), numba.njit(**options)(serial)


_decode_parallel, _decode_serial = _compile_twice(_decode)
_merge_compiled = _compile_twice(_merge)[1]
