"""The CPU attention ladder, llm.c style: the same maths three times, each rung faster.

Every rung offers the kernel protocol (``forward(q, k, v, spec) -> (out, stats)``,
``backward(q, k, v, out, stats, dout, spec, dlse=None) -> (dq, dk, dv)``,
``kernels/protocol.py``), handles everything in the contract (GQA, Dv != D, masks,
bottom-right causal, windows, dropout, empty rows, rows under huge finite masks, a
gradient reaching lse), and is tested against
``kernels/reference.py`` in tests/kernels/test_cpu_flash.py. Shape legend: ``spec.py``.

The kernels take the spec as its records (``*spec.pack()``: bias, band, dropout, reals,
alibi), read only through ``masking.py``'s rules (a score: ``finish_score``); the forward stores stats = (m, l) per row, and
the backward recomputes ``p = exp(s - shift) / norm`` with ``(shift, norm) = row_shift(m,
l)``, the per-row terms computed once by rung 3's ``_bwd_preprocess`` (rows = shift,
1 / norm, delta), which both rungs share.

Measured on the shared 2-core VM (float32, B=1, H=8, N=1024, D=64, no mask; medians;
``python benchmarks/compare_cpu.py --ladder``; docs/performance.md has the run; other
sessions share the machine, so treat the milliseconds as +-30%, the ratios as firmer):

    rung 1  forward_loops / backward_loops       fwd   232 ms    fwd+bwd   841 ms
            One query row (forward, dQ) or one key row (dK/dV) per parallel task, one key
            at a time: online softmax with scalar m, l and a Dv-vector acc, rescaled at
            every key. Every score is a scalar dot product and a scalar libm exp, and the
            backward recomputes each one twice. Accumulates in float64.
    rung 2  forward_tiles / backward_tiles       fwd   194 ms    fwd+bwd   697 ms
            BLOCK_M x BLOCK_N tiles with hand-written tile products (loops the compiler
            vectorises along the contiguous axis); the flash forward (m_i, l_i, acc
            rescaled once per key block) and Triton's backward split: dK/dV with the key
            block resident, dQ with the query block resident. Band-skipping as in rung 3.
            1.2-2x rung 1: the tile loops are still scalar-heavy (row max, libm exp,
            dot products reduced along D), which is what rung 3 removes.
    rung 3  flash.forward / flash.backward       fwd    20 ms    fwd+bwd    61 ms
            (the "numba" backend, kernels/cpu/flash.py) tiles stored keys-major so the
            softmax is element-wise, tile products on a register-tile FMA micro-kernel
            (microkernel.py: 6 x 16 tiles written in LLVM IR, 6 x 32 with AVX-512; ~90 GF/s per
            core on the AVX2 machine these figures are from), the exp
            fused into the score product while the shift can be kept, and a fused
            single-pass backward when heads are plentiful. ~10x rung 2. PyTorch 2.13's CPU
            SDPA, same machine and run: fwd 18.5 ms, fwd+bwd 71 ms (docs/performance.md).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from ..spec import AttentionSpec
from ._compile import (
    alibi_bias, bias_index, cap_and_slope, has_alibi, has_bias, has_dropout, has_softcap, helper,
    in_band, keep, kernel, key_range, prange, query_range,
)
from .flash import _bwd_preprocess, _dlse_array

# -- rung 1: plain loops ------------------------------------------------------------------


def forward_loops(q, k, v, spec: AttentionSpec):
    q, k, v = (np.ascontiguousarray(x, dtype=spec.dtype) for x in (q, k, v))
    out = np.empty((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
    stats = np.empty((2, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)
    _forward_loops(q, k, v, *spec.pack(), out, stats)
    return out, stats


def backward_loops(q, k, v, out, stats, dout, spec: AttentionSpec, dlse=None):
    q, k, v, dout, rows = _backward_inputs(q, k, v, out, stats, dout, spec, dlse)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    records = spec.pack()
    _dq_loops(q, k, v, dout, rows, *records, dq)
    _dkdv_loops(q, k, v, dout, rows, *records, dk, dv)
    return dq, dk, dv


def _backward_inputs(q, k, v, out, stats, dout, spec: AttentionSpec, dlse=None):
    """Contiguous q, k, v, dout, and rows (3, B, Hq, Nq) = (shift, 1 / norm, delta) per
    query row: p = exp(s - shift) / norm (masking.row_shift), delta = rowsum(dO * O) - dlse
    (``protocol.py``: the gradient reaching lse, folded into delta)."""
    q, k, v, out, stats, dout = (np.ascontiguousarray(x, dtype=spec.dtype)
                                 for x in (q, k, v, out, stats, dout))
    rows = np.empty((3, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)
    _bwd_preprocess(out, dout, stats, _dlse_array(dlse, spec), rows)
    return q, k, v, dout, rows


@helper
def finish_score(x, bias_qk, use_bias, band, reals, alibi, b, h, i, j):
    """(s, slope) from the scaled product ``x = scale * q_i . k_j``: ``s = cap(x) +
    alibi_bias + bias`` (each term where the spec has it) and the softcap's slope
    ``d s / d x`` (1 without softcap). Forbidden pairs are the caller's (the band)."""
    slope = 1.0
    if has_softcap(reals):
        x, slope = cap_and_slope(reals, x)
    if has_alibi(alibi):
        x += alibi_bias(alibi, band, b, h, i, j)
    if use_bias:
        x += bias_qk[i, j]
    return x, slope


@helper
def score(q_row, k_row, bias_qk, use_bias, band, reals, alibi, b, h, i, j):
    """(s, slope): the score of query row q_row against key row k_row (see finish_score).

    Computed in the input dtype, as the forward stored its shift m: p = exp(s - m) / l
    must see the same rounding of s in both passes, or a one-hot row's p drifts from 1.
    """
    s = q_row[0] * k_row[0]
    for d in range(1, q_row.shape[0]):
        s += q_row[d] * k_row[d]
    s *= reals[0]
    return finish_score(s, bias_qk, use_bias, band, reals, alibi, b, h, i, j)


@kernel
def _forward_loops(q, k, v, bias, band, dropout, reals, alibi, out, stats):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    drop_scale = reals[1]
    use_bias = has_bias(bias)
    use_dropout = has_dropout(dropout)
    group = Hq // Hkv
    for task in prange(B * Hq * Nq):
        b, h, i = task // (Hq * Nq), task // Nq % Hq, task % Nq
        kv = h // group
        bias_qk = bias[bias_index(bias, b, h)]  # (Nq, Nk); empty without a bias
        m = -np.inf  # running max
        l = 0.0  # running sum of exp(s - m)
        acc = np.zeros(Dv)  # running sum of exp(s - m) * dropout * v_j
        for j in range(Nk):
            if not in_band(band, i, j):
                continue
            s, _ = score(q[b, h, i], k[b, kv, j], bias_qk, use_bias, band, reals, alibi, b, h, i, j)
            if s == -np.inf:  # a masked pair adds nothing (and must not make m NaN)
                continue
            m_new = max(m, s)
            alpha = math.exp(m - m_new)  # rescale what was summed against the old max
            p = math.exp(s - m_new)
            l = l * alpha + p
            if use_dropout and not keep(dropout, b, h, i, j):
                p = 0.0
            p *= drop_scale
            for d in range(Dv):
                acc[d] = acc[d] * alpha + p * v[b, kv, j, d]
            m = m_new
        stats[0, b, h, i] = m  # -inf and 0 on a row with no key allowed
        stats[1, b, h, i] = l
        if l == 0.0:  # no key allowed
            out[b, h, i, :] = 0.0
        else:  # (NaN from a NaN input stays NaN)
            for d in range(Dv):  # a loop, not `acc / l`: an array expression inside prange
                out[b, h, i, d] = acc[d] / l  # fails to compile when it is the first kernel built


@kernel
def _dq_loops(q, k, v, dout, rows, bias, band, dropout, reals, alibi, dq):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale, drop_scale = reals[0], reals[1]
    use_bias = has_bias(bias)
    use_dropout = has_dropout(dropout)
    group = Hq // Hkv
    for task in prange(B * Hq * Nq):  # one query row per task: it owns dq[b, h, i]
        b, h, i = task // (Hq * Nq), task // Nq % Hq, task % Nq
        kv = h // group
        bias_qk = bias[bias_index(bias, b, h)]
        shift, inv_norm, delta = rows[0, b, h, i], rows[1, b, h, i], rows[2, b, h, i]
        dq_row = np.zeros(D)
        for j in range(Nk):
            if not in_band(band, i, j):
                continue
            # forward: p = exp(s - m) / l   (an empty row: inv_norm = 0, so p = 0)
            s, slope = score(q[b, h, i], k[b, kv, j], bias_qk, use_bias, band, reals, alibi, b, h, i, j)
            p = math.exp(s - shift) * inv_norm
            # forward: out_i = sum_j p_ij z_ij v_j  ->  dp_ij = z_ij (dout_i . v_j)
            dp = 0.0
            for d in range(Dv):
                dp += dout[b, h, i, d] * v[b, kv, j, d]
            z = drop_scale if not use_dropout or keep(dropout, b, h, i, j) else 0.0
            # forward: p = softmax(s)  ->  ds = p * (dp - delta)
            # forward: s = cap(x) + alibi + bias  ->  dx = ds * cap'(x)   (slope 1: no cap)
            ds = p * (dp * z - delta) * slope
            # forward: x = scale * q_i . k_j  ->  dq_i += scale * dx * k_j
            for d in range(D):
                dq_row[d] += ds * k[b, kv, j, d]
        dq[b, h, i, :] = dq_row * scale


@kernel
def _dkdv_loops(q, k, v, dout, rows, bias, band, dropout, reals, alibi, dk, dv):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale, drop_scale = reals[0], reals[1]
    use_bias = has_bias(bias)
    use_dropout = has_dropout(dropout)
    group = Hq // Hkv
    for task in prange(B * Hkv * Nk):  # one key row per task: it owns dk, dv[b, kv, j]
        b, kv, j = task // (Hkv * Nk), task // Nk % Hkv, task % Nk
        dk_row = np.zeros(D)
        dv_row = np.zeros(Dv)
        for h in range(kv * group, (kv + 1) * group):  # GQA: sum over the group, in order
            bias_qk = bias[bias_index(bias, b, h)]
            for i in range(Nq):
                if not in_band(band, i, j):
                    continue
                shift, inv_norm, delta = rows[0, b, h, i], rows[1, b, h, i], rows[2, b, h, i]
                s, slope = score(q[b, h, i], k[b, kv, j], bias_qk, use_bias, band, reals, alibi,
                                 b, h, i, j)
                p = math.exp(s - shift) * inv_norm  # forward: p = exp(s - m) / l
                dp = 0.0
                for d in range(Dv):
                    dp += dout[b, h, i, d] * v[b, kv, j, d]
                z = drop_scale if not use_dropout or keep(dropout, b, h, i, j) else 0.0
                ds = p * (dp * z - delta) * slope  # dx of x = scale * q . k (see _dq_loops)
                # forward: out_i = sum_j p_ij z_ij v_j  ->  dv_j += p_ij z_ij dout_i
                for d in range(Dv):
                    dv_row[d] += p * z * dout[b, h, i, d]
                # forward: x = scale * q_i . k_j  ->  dk_j += scale * dx * q_i
                for d in range(D):
                    dk_row[d] += ds * q[b, h, i, d]
        dk[b, kv, j, :] = dk_row * scale
        dv[b, kv, j, :] = dv_row


# -- rung 2: tiles, hand-written tile products ---------------------------------------------

BLOCK_M = 64
BLOCK_N = 64


def forward_tiles(q, k, v, spec: AttentionSpec):
    q, k, v = (np.ascontiguousarray(x, dtype=spec.dtype) for x in (q, k, v))
    out = np.empty((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
    stats = np.empty((2, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)
    _forward_tiles(q, k, v, *spec.pack(), BLOCK_M, BLOCK_N, out, stats)
    return out, stats


def backward_tiles(q, k, v, out, stats, dout, spec: AttentionSpec, dlse=None):
    q, k, v, dout, rows = _backward_inputs(q, k, v, out, stats, dout, spec, dlse)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    records = spec.pack()
    _dkdv_tiles(q, k, v, dout, rows, *records, dk, dv)
    _dq_tiles(q, k, v, dout, rows, *records, dq)
    return dq, dk, dv


@helper
def scores_tile(q_blk, k_blk, s, slopes, bias_qk, use_bias, band, reals, alibi, b, h, i0, j0):
    """s (bm, bn) = cap(scale * q_blk @ k_blk.T) + alibi + bias, -inf outside the band
    (finish_score); slopes (bm, bn) the softcap's slopes, or an empty array: not wanted."""
    bm, bn = s.shape
    with_slopes = slopes.shape[0] > 0
    for ii in range(bm):
        for jj in range(bn):
            x = q_blk[ii, 0] * k_blk[jj, 0]  # in the input dtype, see score()
            for d in range(1, q_blk.shape[1]):
                x += q_blk[ii, d] * k_blk[jj, d]
            x *= reals[0]
            x, slope = finish_score(x, bias_qk, use_bias, band, reals, alibi, b, h, i0 + ii, j0 + jj)
            if not in_band(band, i0 + ii, j0 + jj):
                x = -np.inf
            s[ii, jj] = x
            if with_slopes:
                slopes[ii, jj] = slope


@helper
def online_softmax_update(m, l, acc, s, v, z=None):
    """One key block folded into each row's running softmax: the flash forward's step.

    m (bm,)       the running max of the row's scores so far (-inf: no key seen yet)
    l (bm,)       the running sum of exp(s_j - m) over the keys seen
    acc (bm, Dv)  the running sum of exp(s_j - m) * z_j * v_j over the keys seen
    s (bm, bn)    the new block's scores (-inf: a masked pair)
    v (bn, Dv)    the new block's values
    z (bm, bn)    dropout's multipliers (keep / (1 - p), or 0), or None: no dropout

    The new max m' = max(m, max_j s_j) becomes the shift; what was summed against the old
    one is rescaled by alpha = exp(m - m'), then the block's exp(s_j - m') are added::

        l'   = alpha * l   + sum_j exp(s_j - m')
        acc' = alpha * acc + sum_j exp(s_j - m') z_j v_j

    A row that has seen no allowed key yet keeps m' = -inf and subtracts 0 instead (the
    empty-row rule of ``masking.row_shift``: shift 0), so alpha = exp(-inf) = 0, never
    exp(-inf + inf) = NaN. Updates m, l, acc in place and returns them; afterwards
    out = acc / l (0 where l = 0) and lse = m + log(l) (``protocol.lse_of``).
    """
    bm, bn = s.shape
    for ii in range(bm):
        m_new = max(m[ii], s[ii].max())
        m_safe = m_new if m_new != -np.inf else 0.0
        alpha = math.exp(m[ii] - m_safe)  # rescale what was summed against the old max
        l[ii] *= alpha
        acc[ii] *= alpha
        for jj in range(bn):
            p = math.exp(s[ii, jj] - m_safe)
            l[ii] += p  # l sums the undropped p: lse has no dropout
            if z is not None:
                p *= z[ii, jj]
            for d in range(acc.shape[1]):  # acc += p @ v_blk, one row of the product
                acc[ii, d] += p * v[jj, d]
        m[ii] = m_new
    return m, l, acc


@kernel
def _forward_tiles(q, k, v, bias, band, dropout, reals, alibi, block_m, block_n, out, stats):
    """out (B, Hq, Nq, Dv) and stats (2, B, Hq, Nq) = (m, l), written: block_m x block_n
    tiles, one (batch, head, query block) per task, its key blocks folded in one at a time
    by online_softmax_update."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    drop_scale = reals[1]
    no_slopes = np.empty((0, 0), dtype=q.dtype)
    use_bias = has_bias(bias)
    use_dropout = has_dropout(dropout)
    group = Hq // Hkv
    n_qblocks = (Nq + block_m - 1) // block_m
    for task in prange(B * Hq * n_qblocks):
        b, h, i0 = task // (Hq * n_qblocks), task // n_qblocks % Hq, task % n_qblocks * block_m
        i1 = min(i0 + block_m, Nq)
        bm = i1 - i0
        kv = h // group
        bias_qk = bias[bias_index(bias, b, h)]
        q_blk = q[b, h, i0:i1]
        m_i = np.full(bm, -np.inf)
        l_i = np.zeros(bm)
        acc = np.zeros((bm, Dv))
        s = np.empty((bm, block_n), dtype=q.dtype)
        z = np.empty((bm if use_dropout else 0, block_n))
        j_start, j_stop = key_range(band, i0, i1, Nk)
        for j0 in range(j_start, j_stop, block_n):
            j1 = min(j0 + block_n, j_stop)
            bn = j1 - j0
            scores_tile(q_blk, k[b, kv, j0:j1], s[:, :bn], no_slopes, bias_qk, use_bias, band, reals,
                        alibi, b, h, i0, j0)
            if use_dropout:
                for ii in range(bm):
                    for jj in range(bn):
                        z[ii, jj] = drop_scale if keep(dropout, b, h, i0 + ii, j0 + jj) else 0.0
                online_softmax_update(m_i, l_i, acc, s[:, :bn], v[b, kv, j0:j1], z[:, :bn])
            else:
                online_softmax_update(m_i, l_i, acc, s[:, :bn], v[b, kv, j0:j1])
        for ii in range(bm):
            stats[0, b, h, i0 + ii] = m_i[ii]  # -inf and 0 on a row with no key allowed
            stats[1, b, h, i0 + ii] = l_i[ii]
            if l_i[ii] == 0.0:  # no key allowed
                out[b, h, i0 + ii, :] = 0.0
            else:
                for d in range(Dv):  # a loop, not an array expression (see _forward_loops)
                    out[b, h, i0 + ii, d] = acc[ii, d] / l_i[ii]


@helper
def probs_and_dscores(q_blk, k_blk, v_blk, do_blk, rows_blk, p, ds, slopes, bias, band, dropout,
                      reals, alibi, b, h, i0, j0):
    """One backward tile, (bm, bn): p <- p * z (the dropped probabilities), ds <- dL/dx,
    the gradient of the scaled product x = scale * q . k (through the softcap: ``slopes``,
    (bm, bn) with softcap, else empty).

    rows_blk (3, bm): the block's (shift, 1 / norm, delta), see ``_backward_inputs``."""
    drop_scale = reals[1]
    use_bias = has_bias(bias)
    use_cap = has_softcap(reals)
    scores_tile(q_blk, k_blk, p, slopes, bias[bias_index(bias, b, h)], use_bias, band, reals, alibi,
                b, h, i0, j0)
    bm, bn = p.shape
    for ii in range(bm):
        shift, inv_norm, delta = rows_blk[0, ii], rows_blk[1, ii], rows_blk[2, ii]
        for jj in range(bn):
            # forward: p = exp(s - m) / l   (an empty row: inv_norm = 0, so p = 0)
            p_ij = math.exp(p[ii, jj] - shift) * inv_norm
            # forward: out = (p * z) @ v  ->  dp = z * (dout @ v.T)
            dp = 0.0
            for d in range(v_blk.shape[1]):
                dp += do_blk[ii, d] * v_blk[jj, d]
            z = drop_scale
            if has_dropout(dropout) and not keep(dropout, b, h, i0 + ii, j0 + jj):
                z = 0.0
            # forward: p = softmax(s)  ->  ds = p * (dp - delta)
            ds[ii, jj] = p_ij * (dp * z - delta)
            # forward: s = cap(x) + alibi + bias  ->  dx = ds * cap'(x)
            if use_cap:
                ds[ii, jj] *= slopes[ii, jj]
            p[ii, jj] = p_ij * z


@kernel
def _dkdv_tiles(q, k, v, dout, rows, bias, band, dropout, reals, alibi, dk, dv):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = reals[0]
    group = Hq // Hkv
    n_kblocks = (Nk + BLOCK_N - 1) // BLOCK_N
    for task in prange(B * Hkv * n_kblocks):  # the key block stays resident
        b, kv, j0 = task // (Hkv * n_kblocks), task // n_kblocks % Hkv, task % n_kblocks * BLOCK_N
        j1 = min(j0 + BLOCK_N, Nk)
        bn = j1 - j0
        k_blk, v_blk = k[b, kv, j0:j1], v[b, kv, j0:j1]
        dk_acc = np.zeros((bn, D))
        dv_acc = np.zeros((bn, Dv))
        p = np.empty((BLOCK_M, bn), dtype=q.dtype)
        ds = np.empty((BLOCK_M, bn))
        slopes = np.empty((BLOCK_M if has_softcap(reals) else 0, bn), dtype=q.dtype)
        i_start, i_stop = query_range(band, j0, j1, Nq)
        for h in range(kv * group, (kv + 1) * group):
            for i0 in range(i_start, i_stop, BLOCK_M):
                i1 = min(i0 + BLOCK_M, i_stop)
                bm = i1 - i0
                probs_and_dscores(q[b, h, i0:i1], k_blk, v_blk, dout[b, h, i0:i1], rows[:, b, h, i0:i1],
                                  p[:bm], ds[:bm], slopes[:bm], bias, band, dropout, reals, alibi,
                                  b, h, i0, j0)
                for ii in range(bm):
                    for jj in range(bn):
                        # dv += (p * z).T @ dout ;  dk += ds.T @ q   (scale applied below)
                        for d in range(Dv):
                            dv_acc[jj, d] += p[ii, jj] * dout[b, h, i0 + ii, d]
                        for d in range(D):
                            dk_acc[jj, d] += ds[ii, jj] * q[b, h, i0 + ii, d]
        dk[b, kv, j0:j1] = dk_acc * scale
        dv[b, kv, j0:j1] = dv_acc


@kernel
def _dq_tiles(q, k, v, dout, rows, bias, band, dropout, reals, alibi, dq):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = reals[0]
    group = Hq // Hkv
    n_qblocks = (Nq + BLOCK_M - 1) // BLOCK_M
    for task in prange(B * Hq * n_qblocks):  # the query block stays resident
        b, h, i0 = task // (Hq * n_qblocks), task // n_qblocks % Hq, task % n_qblocks * BLOCK_M
        i1 = min(i0 + BLOCK_M, Nq)
        bm = i1 - i0
        kv = h // group
        dq_acc = np.zeros((bm, D))
        p = np.empty((bm, BLOCK_N), dtype=q.dtype)
        ds = np.empty((bm, BLOCK_N))
        slopes = np.empty((bm if has_softcap(reals) else 0, BLOCK_N), dtype=q.dtype)
        j_start, j_stop = key_range(band, i0, i1, Nk)
        for j0 in range(j_start, j_stop, BLOCK_N):
            j1 = min(j0 + BLOCK_N, j_stop)
            bn = j1 - j0
            probs_and_dscores(q[b, h, i0:i1], k[b, kv, j0:j1], v[b, kv, j0:j1], dout[b, h, i0:i1],
                              rows[:, b, h, i0:i1], p[:, :bn], ds[:, :bn], slopes[:, :bn], bias,
                              band, dropout, reals, alibi, b, h, i0, j0)
            for ii in range(bm):
                for jj in range(bn):  # dq += ds @ k_blk  (scale applied below)
                    for d in range(D):
                        dq_acc[ii, d] += ds[ii, jj] * k[b, kv, j0 + jj, d]
        dq[b, h, i0:i1] = dq_acc * scale


RUNGS = {
    1: SimpleNamespace(forward=forward_loops, backward=backward_loops),
    2: SimpleNamespace(forward=forward_tiles, backward=backward_tiles),
}
