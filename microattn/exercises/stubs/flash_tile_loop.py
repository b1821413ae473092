"""Exercise 6: the flash forward's tile loop, compiled with numba.

    q (B, Hq, Nq, D)   k (B, Hkv, Nk, D)   v (B, Hkv, Nk, Dv)     Hq a multiple of Hkv (GQA:
    query head h reads kv head h // (Hq // Hkv))
    out (B, Hq, Nq, Dv)   stats (2, B, Hq, Nq): stats[0] = m, stats[1] = l, per query row

The flash forward never builds the (Nq, Nk) score matrix. For every batch b, head h and
block of ``block_m`` query rows [i0, i1):

    m, l, acc = -inf, 0, 0                      (per row of the block; acc (rows, Dv))
    for each block of ``block_n`` keys [j0, j1) in the keys the band lets these rows see
    (``j_start, j_stop = key_range(band, i0, i1, Nk)``: causal rows skip the future):
        s = block_scores(...)                   (rows, j1 - j0), -inf where masked
        m, l, acc = online_softmax_update(m, l, acc, s, v[b, kv, j0:j1])     (exercise 5)
    out[b, h, i0:i1] = acc / l  (0 on a row with l = 0: it allowed no key)
    stats[0, b, h, i0:i1] = m;  stats[1, b, h, i0:i1] = l

The last block of each kind may be short: i1 = min(i0 + block_m, Nq), j1 = min(j0 + block_n, j_stop).

The spec reaches the kernel as records (``*spec.pack()``: bias, band, dropout, reals, alibi);
``block_scores`` below reads them for you, so causal masks, windows and biases all come out
of it as -inf or added terms. Dropout is left out here (the grader uses none; the library's
kernel also builds a tile of dropout multipliers for the update).

Keep ``@numba.njit`` on your function: the grader checks it is compiled. (To debug in plain
Python, comment the decorator out for a moment; numba's errors name the line they fail on.)
Try ``attention(q, k, v, causal=True, block_m=4, block_n=3)`` on small arrays, then grade:

    microattn exercise check 6 DIR        (DIR: the directory holding this file)
    microattn exercise hint 6             (if stuck)
"""

import math  # noqa: F401 - for your code

import numba
import numpy as np

from microattn.kernels.cpu.ladder import (  # noqa: F401 - for your code
    bias_index,
    has_bias,
    key_range,
    online_softmax_update,
    scores_tile,
)
from microattn.kernels.spec import make_attention_spec


@numba.njit
def flash_forward_tiles(q, k, v, bias, band, dropout, reals, alibi, block_m, block_n, out, stats):
    """Write out (B, Hq, Nq, Dv) and stats (2, B, Hq, Nq) = (m, l) for q, k, v (legend above),
    in tiles of block_m query rows by block_n keys, with the online softmax update.

    bias, band, dropout, reals, alibi: the spec's records, handed to block_scores as they are.
    Returns nothing: out and stats are filled in place.
    """
    raise NotImplementedError  # your code here


@numba.njit
def block_scores(q, k, bias, band, reals, alibi, b, h, i0, i1, j0, j1, s):
    """The scores of query rows [i0, i1) of batch b, head h against keys [j0, j1) of its kv
    head, written into s[:i1 - i0, :j1 - j0] and returned as that view: scale * q . k, plus
    bias, ALiBi or softcap where the spec has them, -inf where the pair is masked (causal,
    windows). ``s`` is a scratch array of at least (i1 - i0, j1 - j0), e.g.
    ``np.empty((block_m, block_n), dtype=q.dtype)`` made once per query block.
    """
    kv = h // (q.shape[1] // k.shape[1])
    tile = s[:i1 - i0, :j1 - j0]
    no_slopes = np.empty((0, 0), dtype=q.dtype)
    scores_tile(q[b, h, i0:i1], k[b, kv, j0:j1], tile, no_slopes, bias[bias_index(bias, b, h)], has_bias(bias),
                band, reals, alibi, b, h, i0, j0)
    return tile


def attention(q, k, v, causal=False, block_m=16, block_n=16):
    """(out, stats) through your flash_forward_tiles, for arrays shaped as the legend says."""
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), is_causal=causal)
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))
    out = np.zeros((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
    stats = np.zeros((2, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)
    flash_forward_tiles(q, k, v, *spec.pack(), block_m, block_n, out, stats)
    return out, stats
