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

One task per (b, kv head, key split): the group's query heads and their queries (``R =
group * Nq`` rows) against that kv head's keys, **each key and value row read once for the
whole group** (not once per query head: the step is a read of the cache, so reading it
``group`` times cost ``group`` times as much). Over the keys any of the task's rows may see
(``key_range`` per row, their union, cut to the split's keys)::

    pass 1:  S[r, j] = (scale * q_r) . k_j                   K read once, q rows resident
    rows:    cap, + ALiBi, + bias (masking.py's order), -inf outside row r's band;
             m_r = max_j S[r, j], P[r, j] = exp(S[r, j] - shift_r), l_r = sum_j P[r, j]
             (shift = m, or 0 on a row with no key: masking.row_shift's rule; then dropout)
    pass 2:  acc[r] = sum_j P[r, j] v_j                        V read once, acc resident

**Split-KV (flash-decoding).** Each split leaves a partial ``(m, l, acc)`` per row;
``merge_partials`` merges them with ``merge.merge_rows``, the formula of
``merge_attention_states`` and of sinks. ``splits_for`` cuts the keys when there are
fewer (b, kv head) tasks than twice the threads (one kv head, MQA: both cores read half the
cache each); with kv heads enough, one split.

Measured (float32, B=1, Hq=32, Hkv=8, D=128, Nk=32768, one query, 2 cores, medians of
``benchmarks/compare_decode.py``): 21.4 ms a step, the cache's 268 MB read as fast as
``np.copyto`` copies them (21.3 ms), 1.54x PyTorch 2.13's SDPA on the same call (32.9 ms);
MQA (Hkv=1, 4 splits) 8.2 ms, 2.1x PyTorch. Reading K and V once per query head instead
(the previous version of this kernel) cost 3-4x as much.

The numba backend runs this kernel for calls of at most ``MAX_QUERIES`` queries that record
no graph (``functional.scaled_dot_product_attention``; ``nn``'s KV-cache steps call it
directly). The backward delegates to the reference (decoding is inference; the protocol
wants one): a graph goes to the tiled kernel, whose backward must recompute its own
forward's scores bit for bit (at logits ~1e3 a float32 rounding difference of the score
moves p by 6e-5).
"""

from __future__ import annotations

import types

import numpy as np

from .. import masking, reference, sinks
from ..compile import compile_rules
from ..merge import merge_rows
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
MIN_SPLIT = 1024  # keys per split, at least: smaller splits cost more in merging than they save

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


def forward(q, k, v, spec: AttentionSpec, splits: int | None = None):
    """out (B, Hq, Nq, Dv), stats (2, B, Hq, Nq); k and v are read where they lie.
    ``splits``: how many parts the keys are cut into (None: :func:`splits_for`)."""
    if splits is None:
        splits = splits_for(spec)
    q = np.ascontiguousarray(q, dtype=spec.dtype)
    k_rows, v_rows = _cache_rows(k, spec.dtype), _cache_rows(v, spec.dtype)
    packed = spec.pack()
    m_part = np.empty((splits, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)
    l_part = np.empty_like(m_part)
    acc_part = np.empty((splits, spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
    work = spec.B * spec.Hq * spec.Nq * spec.Nk
    step = _decode_parallel if work >= PARALLEL_WORK else _decode_serial
    step(q, k_rows, v_rows, spec.Nk, *packed, splits, m_part, l_part, acc_part)
    return merge_partials(m_part, l_part, acc_part)


def merge_partials(m_part, l_part, acc_part):
    """out (B, Hq, Nq, Dv), stats (2, B, Hq, Nq) from partial results over disjoint key sets:
    m_part, l_part (parts, B, Hq, Nq) each part's shift and sum, acc_part (parts, B, Hq,
    Nq, Dv) its *unnormalised* sum of exp(s - m) v. Split-KV decoding ends here (ring
    attention folds the same ``merge.merge_rows`` one step at a time: ``distributed/ring.py``,
    ``ring_step``); the formula is folded over the parts in order. A part that saw no key:
    (-inf, 0, 0)."""
    def normalised(part):
        l = l_part[part]
        return acc_part[part] / np.where(l == 0, np.ones_like(l), l)[..., None]

    m, l, out = m_part[0], l_part[0], normalised(0)
    for part in range(1, m_part.shape[0]):
        m, l, w_out, w_part = merge_rows(m, l, m_part[part], l_part[part])
        out = w_out[..., None] * out + w_part[..., None] * normalised(part)
    return out.astype(acc_part.dtype, copy=False), np.stack([m, l]).astype(m_part.dtype, copy=False)


def splits_for(spec: AttentionSpec, threads: int | None = None) -> int:
    """Key splits that give every thread two tasks (``B * Hkv * splits >= 2 * threads``),
    each split at least ``MIN_SPLIT`` keys: one split when there are kv heads enough."""
    if threads is None:
        threads = numba.get_num_threads() if numba is not None else 1
    tasks = spec.B * spec.Hkv
    wanted = -(-2 * threads // tasks)  # ceil
    return max(1, min(wanted, spec.Nk // MIN_SPLIT))


def backward(q, k, v, out, stats, dout, spec: AttentionSpec, dlse=None):
    """The reference's backward (decoding is inference: correct, not fast), on the row
    statistics of the reference's own scores: this kernel's dot products round differently,
    and at large logits exp magnifies that (float32, scores ~1e3: 6e-5 in dv)."""
    stats = reference.row_stats(reference.scores(q, k, spec))
    if spec.sinks is not None:  # the caller folded them into the forward's stats (sinks.py)
        stats = sinks.fold(out, stats, spec.sinks)[1]
    return reference.backward(q, k, v, out, stats, dout, spec, dlse)


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


# -- the step ---------------------------------------------------------------------------


def _decode(q, k, v, Nk, bias, band, dropout, reals, alibi, splits, m_part, l_part, acc_part):
    B, Hq, Nq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]  # k, v (B, Hkv, capacity, D/Dv): rows >= Nk unread
    group = Hq // Hkv
    R = group * Nq  # the rows of one task: row r is query head kv * group + r // Nq, query r % Nq
    t = q.dtype.type
    scale, dropout_scale = reals[0], reals[1]
    use_bias, use_dropout = has_bias(bias), has_dropout(dropout)
    use_cap, use_alibi = has_softcap(reals), has_alibi(alibi)
    for task in prange(B * Hkv * splits):
        b, kv_head, split = task // (Hkv * splits), (task // splits) % Hkv, task % splits
        split_start, split_stop = split * Nk // splits, (split + 1) * Nk // splits
        # the keys any row of the task may see, cut to the split's
        j_lo, j_hi = split_stop, split_start
        for i in range(Nq):
            j_start, j_stop = key_range(band, i, i + 1, Nk)
            j_lo, j_hi = min(j_lo, max(j_start, split_start)), max(j_hi, min(j_stop, split_stop))
        n = max(j_hi - j_lo, 0)
        qs = np.empty((R, D), dtype=q.dtype)  # the group's queries, scaled
        for r in range(R):
            for d in range(D):
                qs[r, d] = q[b, kv_head * group + r // Nq, r % Nq, d] * scale
        scores = np.empty((R, n), dtype=q.dtype)
        # pass 1: s = scale * q . k for every row, each key row read once for the group
        for j in range(j_lo, j_hi):
            k_row = k[b, kv_head, j]
            for r in range(R):
                q_row = qs[r]
                dot = t(0)
                for d in range(D):
                    dot += q_row[d] * k_row[d]
                scores[r, j - j_lo] = dot
        # per row: bias, the band, the max and p = exp(s - shift)
        shift = np.empty(R, dtype=q.dtype)
        for r in range(R):
            h, i = kv_head * group + r // Nq, r % Nq
            row = scores[r]
            if use_cap:  # the score's terms in masking.py's order: cap, ALiBi, bias
                for jj in range(n):
                    row[jj] = cap(reals, row[jj])
            if use_alibi:
                for j in range(j_lo, j_hi):
                    row[j - j_lo] += alibi_bias(alibi, band, b, h, i, j)
            if use_bias:
                bb, hh = bias_index(bias, b, h)
                for j in range(j_lo, j_hi):
                    row[j - j_lo] += bias[bb, hh, i, j]
            j_start, j_stop = key_range(band, i, i + 1, Nk)  # one row: exactly its keys
            for j in range(j_lo, j_hi):
                if j < j_start or j >= j_stop:
                    row[j - j_lo] = -np.inf
            m = t(-np.inf)
            for jj in range(n):
                m = row[jj] if row[jj] > m else m
            shift[r] = t(0) if m == -np.inf else m
            l = t(0)
            for jj in range(n):
                p = fast_exp(row[jj] - shift[r])
                l += p
                row[jj] = p
            if use_dropout:
                for j in range(j_lo, j_hi):
                    row[j - j_lo] *= dropout_scale if keep(dropout, b, h, i, j) else t(0)
            m_part[split, b, h, i], l_part[split, b, h, i] = m, l
        # pass 2: acc = sum_j p_j v_j for every row, each value row read once for the group
        acc = np.zeros((R, Dv), dtype=q.dtype)
        for j in range(j_lo, j_hi):
            v_row = v[b, kv_head, j]
            for r in range(R):
                p = scores[r, j - j_lo]
                acc_row = acc[r]
                for e in range(Dv):
                    acc_row[e] += p * v_row[e]
        for r in range(R):
            for e in range(Dv):
                acc_part[split, b, kv_head * group + r // Nq, r % Nq, e] = acc[r, e]


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
