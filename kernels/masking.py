"""The rules of attention, written once: who may attend to whom, which probabilities dropout
keeps, where a bias plane is read, and how a row's probabilities are recomputed.

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
    reals   = (scale, dropout_scale)                  dtype   (floating constants)
    bias    = (Bm, Hm, Nq, Nk) array, or (1, 1, 0, 0) when there is none

``in_band`` and ``keep`` only use ``+ - * ^ & | >> >= <=`` (no ``if``, no ``and``/``or``,
which do not broadcast over arrays). The other helpers take scalars and may branch. All
integer arithmetic is int64 with explicit 32-bit masking, which gives the same bits in
Python (unbounded ints), NumPy (wrapping int64), numba on the CPU and numba on the GPU.
"""

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
