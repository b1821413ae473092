"""The rules of attention, written once: who may attend to whom, which probabilities dropout
keeps, where a bias plane is read, how scores are capped (softcap) and biased by distance
(ALiBi), and how a row's probabilities are recomputed.

These are plain Python functions on integers and floats. They are used three ways, unchanged:

* by ``reference.py`` on NumPy arrays (``in_band``, ``keep``: broadcast over ``i[:, None]``
  and ``j``; the scalar rules through ``np.vectorize``),
* compiled for the CPU kernels with ``numba.njit`` (``cpu/_compile.py``),
* compiled for the GPU kernels with ``numba.cuda.jit(device=True)`` (``cuda/``),

both through :func:`microattn.kernels.compile.compile_rules`, the one place that compiles
this module.

**The spec as records.** Kernels never take a dozen loose scalars: ``AttentionSpec.pack()``
hands them a few small tuples (``spec.py`` documents each field), and the helpers here unpack
them, so a new feature is a field and a helper, not an argument in every signature::

    band    = (offset, window_left, window_right)     int64   (who may see whom)
    dropout = (threshold, seed_lo, seed_hi, h0, i0, j0)   int64   (threshold 0: no dropout;
                                                          (h0, i0, j0) the call's origin)
    reals   = (scale, dropout_scale, softcap)         dtype   (floating constants; softcap 0: off)
    bias    = (Bm, Hm, Nq, Nk) array, or (1, 1, 0, 0) when there is none
    alibi   = (Ba, Hq) slopes, Ba in {1, B}, or (1, 0) when there is none
    blocks  = (B, Hq, nr, nc) int8 block mask of a user's mask_mod (mods.block_mask; the
              CUDA kernels' one more record, read by tile_class), or (1, 1, 0, 0)

A score is built in one order everywhere (docs/semantics.md)::

    s = scale * q . k  ->  cap(reals, s)  ->  + alibi_bias(..)  + bias  ->  -inf outside the band

``in_band`` and ``keep`` only use ``+ - * ^ & | >> >= <=`` (no ``if``, no ``and``/``or``,
which do not broadcast over arrays). The other helpers take scalars and may branch. All
integer arithmetic is int64 with explicit 32-bit masking, which gives the same bits in
Python (unbounded ints), NumPy (wrapping int64), numba on the CPU and numba on the GPU.
"""

import numpy as np

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # 2**32 / golden ratio: keeps an all-zero input from mapping to 0


# -- the band: causal and windows ---------------------------------------------------------


def in_band(band, i, j):
    """True when key ``j`` lies in query ``i``'s band (causal and window folded together).

    ``band = (offset, window_left, window_right)``; ``d = j - (i + offset)`` is the key's
    distance from the query's diagonal; the pair is allowed iff
    ``-window_left <= d <= window_right``, a side of -1 being unbounded.

    Worked example: Nq = Nk = 6 (offset 0), window (2, 0): query 4 sees keys 2, 3, 4.
    With Nq = 2, Nk = 6 (offset 4) and causal (window (-1, 0)): query 0 sees keys 0..4.
    """
    offset, window_left, window_right = band
    d = j - (i + offset)
    return ((window_left < 0) | (d >= -window_left)) & ((window_right < 0) | (d <= window_right))


def key_range(band, i_start, i_stop, Nk):
    """Keys [j_start, j_stop) that queries [i_start, i_stop) may see through the band: the
    key blocks a query block visits (band-skipping). Scalars only.

    Worked example: Nq = Nk = 8, window (2, 0) (a causal sliding window of 3 keys);
    queries 4..5 see keys 2..5, so key_range((0, 2, 0), 4, 6, 8) == (2, 6).
    """
    offset, window_left, window_right = band
    j_start = 0
    j_stop = Nk
    if window_left >= 0:
        j_start = max(0, i_start + offset - window_left)
    if window_right >= 0:
        j_stop = min(Nk, i_stop - 1 + offset + window_right + 1)
    return j_start, max(j_start, j_stop)


def query_range(band, j_start, j_stop, Nq):
    """Queries [i_start, i_stop) that may see some key in [j_start, j_stop) through the
    band: the query blocks a key block visits in the dK/dV pass. Scalars only."""
    offset, window_left, window_right = band
    i_start = 0
    i_stop = Nq
    if window_right >= 0:
        i_start = max(0, j_start - offset - window_right)
    if window_left >= 0:
        i_stop = min(Nq, j_stop - 1 - offset + window_left + 1)
    return i_start, max(i_start, i_stop)


def tile_in_band(band, i0, bm, j0, bn):
    """Whether every (query, key) pair of the tile [i0, i0+bm) x [j0, j0+bn) is inside the
    band. The band is an interval of diagonals, so two corners decide the whole tile."""
    return in_band(band, i0 + bm - 1, j0) & in_band(band, i0, j0 + bn - 1)


# -- the bias plane -----------------------------------------------------------------------


def has_bias(bias):
    """Whether the bias record holds a bias: "none" is an empty (1, 1, 0, 0) array."""
    return bias.shape[3] > 0


def bias_index(bias, b, h):
    """(batch, head) index of the bias plane that batch ``b``, query head ``h`` reads: a
    (Bm, Hm, Nq, Nk) bias broadcasts over a size-1 batch or head axis."""
    bb = b if bias.shape[0] > 1 else 0
    hh = h if bias.shape[1] > 1 else 0
    return bb, hh


# -- softcap: c * tanh(s / c) ------------------------------------------------------------


def tanh(x):
    """tanh, elementwise: NumPy's on arrays; compiled, libm's (CPU) or libdevice's (GPU).

    The CPU kernels compile the rules with a vectorisable float32 version of this same
    function in its place (``cpu/_compile.py``: ``fast_tanh``, within 2 ulp)."""
    return np.tanh(x)


def has_softcap(reals):
    """Whether the reals record caps the scores: ``reals = (scale, dropout_scale, softcap)``,
    softcap 0 meaning no cap."""
    return reals[2] > 0.0


def cap(reals, s):
    """The capped score ``c * tanh(s / c)``, ``c = reals[2]`` (only where has_softcap: with
    c = 0 this is not the identity). ``s`` is the scaled score ``scale * q . k``; Gemma 2's
    order: the cap comes before any bias or mask is added.

    Worked example: c = 2, s = 1: 2 * tanh(0.5) = 0.9242; s = 100: 2.0 (to rounding);
    s = -inf: -2 (a masked pair is masked after the cap, by its -inf bias or the band).
    """
    c = reals[2]
    return c * tanh(s / c)


def cap_and_slope(reals, s):
    """``(cap(reals, s), d cap / d s)``: the backward's factor ``1 - tanh(s / c)**2``, as
    ``(c - capped) (c + capped) / c**2`` (no floating literal, so a float32 kernel stays
    float32; and ``c - capped`` is exact where the slope is small, unlike ``1 - t*t``).

    forward: x = c * tanh(s / c)  ->  ds = dx * (1 - tanh(s / c)**2)
    """
    c = reals[2]
    capped = c * tanh(s / c)
    return capped, (c - capped) * (c + capped) / (c * c)


# -- ALiBi: a bias linear in the distance from the diagonal ------------------------------


def has_alibi(alibi):
    """Whether the alibi record holds slopes: "none" is an empty (1, 0) array."""
    return alibi.shape[1] > 0


def alibi_bias(alibi, band, b, h, i, j):
    """``-slope * |i + offset - j|``, the ALiBi term of pair (i, j) for batch b, query head h
    (flash-attention's convention: the distance from the pair's diagonal, bottom-right
    aligned as the band is). ``alibi`` (Ba, Hq) holds the slopes, Ba = 1 broadcasting over
    the batch; ``band[0]`` is the offset Nk - Nq. Broadcasts over NumPy index arrays.

    Worked example: slope 0.5, Nq = 2, Nk = 4 (offset 2): query 1 and key 0 are 3 apart,
    bias -1.5; query 1 and key 3 lie on the diagonal, bias 0 (-0.0).
    """
    bb = b if alibi.shape[0] > 1 else 0
    distance = alibi.dtype.type(i + band[0] - j)  # exact below 2**24 (float32)
    return -alibi[bb, h] * abs(distance)


# -- dropout: a counter-based hash --------------------------------------------------------


def mix32(x):
    """A 32-bit integer bijection with good avalanche (xor-shift-multiply, 'lowbias32' constants)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    x = x ^ (x >> 16)
    return x


def dropout_bits(seed_lo, seed_hi, b, h, i, j):
    """Counter-based hash of (seed, b, h, i, j) to a uniform 32-bit integer.

    Each coordinate is absorbed by ``x = mix32(x + GOLDEN32 + c)``; since ``mix32`` is a
    bijection, two counters that differ in one coordinate never share a state after it.
    ``h`` is the query head, ``i`` the query index (0..Nq-1), ``j`` the key index.
    """
    x = mix32((seed_lo + GOLDEN32) & MASK32)
    x = mix32((x + GOLDEN32 + seed_hi) & MASK32)
    x = mix32((x + GOLDEN32 + b) & MASK32)
    x = mix32((x + GOLDEN32 + h) & MASK32)
    x = mix32((x + GOLDEN32 + i) & MASK32)
    x = mix32((x + GOLDEN32 + j) & MASK32)
    return x


def keep(dropout, b, h, i, j):
    """Dropout keeps element (b, h, i, j) iff its hash is >= threshold = round(p * 2**32).

    ``dropout = (threshold, seed_lo, seed_hi, h0, i0, j0)``; with threshold 0 every element
    is kept. (h0, i0, j0) is the call's origin: a call computing a block of a larger
    attention (a sequence-parallel rank's rows, keys from another rank, a share of the
    heads) hashes the larger call's indices, so its mask is the one-process mask.
    """
    threshold, seed_lo, seed_hi, h0, i0, j0 = dropout
    return dropout_bits(seed_lo, seed_hi, b, h + h0, i + i0, j + j0) >= threshold


def has_dropout(dropout):
    """Whether the dropout record drops anything (threshold > 0)."""
    return dropout[0] > 0


# -- the block mask of a user's mask_mod (mods.py) ----------------------------------------


def tile_class(blocks, chunks, b, h, i0, i1, j0, j1):
    """What a user's mask_mod allows in the tile of queries [i0, i1) x keys [j0, j1) (both
    non-empty, inside the call): 0 no pair (the tile is skipped), 1 some (each pair is
    tested), 2 every pair (no per-pair test). Scalars only.

    ``blocks`` (B, Hq, nr, nc) int8 is the call's block mask (``mods.block_mask``): the same
    class for each ``chunks = (chunk_q, chunk_k)`` chunk of queries x keys; a tile takes the
    classes of the chunks it overlaps, so tiles of any size and alignment can read it.

    Worked example: chunks (4, 4), Nq = Nk = 8, causal as a mask_mod: blocks[b, h] =
    [[1, 0], [2, 1]]; the tile of queries 4..7 and keys 0..3 is class 2, queries 0..3 with
    keys 4..7 class 0, queries 2..5 with keys 0..3 class 1.
    """
    chunk_q, chunk_k = chunks
    lo = 2
    hi = 0
    for r in range(i0 // chunk_q, (i1 - 1) // chunk_q + 1):
        for c in range(j0 // chunk_k, (j1 - 1) // chunk_k + 1):
            x = blocks[b, h, r, c]
            lo = min(lo, x)
            hi = max(hi, x)
    if hi == 0:
        return 0
    return 2 if lo == 2 else 1


# -- the row statistics: how probabilities are recomputed ---------------------------------


def row_shift(m, l):
    """(shift, norm) such that the backward's probabilities are ``p = exp(s - shift) / norm``.

    The forward keeps, per query row, the shift ``m`` its exps were taken against (the
    running max) and the sum ``l = sum_j exp(s_j - m)``; ``lse = m + log(l)``. The backward
    never recomputes p from lse: when a float mask of -1e9 (or finfo.min) covers a whole row,
    ``m`` is ~-1e9 and ``m + log(l)`` rounds ``log(l)`` away, so ``exp(s - lse)`` would give
    every key p = 1 instead of 1/Nk. ``exp(s - m) / l`` is exact there (docs/semantics.md).

    A row that allowed no key (``l == 0``, so ``m == -inf``) gets shift 0 and norm ``-m =
    +inf``: p = exp(-inf) / inf = 0 everywhere, never NaN. A NaN statistic stays NaN. (No
    floating literal but 0.0 appears here, so a float32 kernel stays free of float64.)
    """
    if l == 0.0:
        return l, -m
    return m, l
